"""Is the low-rank structure linear? PCA against a nonlinear autoencoder of the same width (paper 3.1).

If activations lay on a curved low-dimensional manifold, a nonlinear autoencoder with a ``rank``-wide
bottleneck would reconstruct held-out rows better than rank-``rank`` PCA; if the structure is a linear
subspace, it cannot beat PCA (Eckart-Young) and the gain is ~0 or negative.

Both models are affine: PCA is fitted on the train rows after subtracting their mean, because the
autoencoder's biases can represent an offset too, so the gain measures curvature and not the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from laser.analysis.spectra import as_matrix, principal_basis


@dataclass(frozen=True)
class LinearityResult:
    """Held-out reconstruction cosines of rank-``rank`` PCA and of the autoencoder.

    ``gain = autoencoder_cosine - pca_cosine``: clearly positive means a curved manifold.
    """

    rank: int
    pca_cosine: float
    autoencoder_cosine: float
    gain: float
    train_rows: int
    test_rows: int


def _cosine(a: Tensor, b: Tensor) -> float:
    """Frobenius cosine between two matrices of the same shape, in fp64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return ((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300)).item()


def _autoencoder(dim: int, hidden: int, rank: int) -> nn.Sequential:
    """``D -> hidden -> rank -> hidden -> D`` with SiLU, linear bottleneck and output."""
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.SiLU(),
        nn.Linear(hidden, rank),
        nn.Linear(rank, hidden),
        nn.SiLU(),
        nn.Linear(hidden, dim),
    )


def linearity_check(
    x: Tensor,
    rank: int,
    hidden: int | None = None,
    steps: int = 1000,
    lr: float = 3e-3,
    batch_size: int = 256,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> LinearityResult:
    """Compare rank-``rank`` PCA with a SiLU autoencoder on held-out rows of ``x`` ``(N, D)``.

    Rows are split at random (seeded) into train and test. PCA: the top-``rank`` principal directions of
    the centered train rows. Autoencoder: ``D -> hidden -> rank -> hidden -> D`` (``hidden`` defaults to
    ``max(128, 2 * rank)``), trained with Adam for ``steps`` minibatches of ``batch_size`` train rows on
    MSE, with a cosine-decaying learning rate from ``lr``, on data shifted by the train mean and scaled by
    the train RMS (an affine change of units, so it does not help either model). Both are scored by the
    reconstruction cosine on the test rows. The result depends only on the inputs and ``seed``; the
    global RNG state is left untouched.
    """
    x = as_matrix(x)
    n, d = x.shape
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    test_rows = max(1, round(n * test_fraction))
    train_rows = n - test_rows
    if train_rows < 2:
        raise ValueError(f"need at least 2 train rows; got N={n} with test_fraction={test_fraction}")
    if not isinstance(rank, int) or not 1 <= rank <= min(train_rows, d):
        limit = min(train_rows, d)
        raise ValueError(f"rank must be an int in [1, min(train rows, D)] = [1, {limit}], got {rank!r}")
    hidden = max(128, 2 * rank) if hidden is None else hidden
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be a positive int, got {hidden!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).to(x.device)
    train = x[order[:train_rows]].to(torch.float64)  # (n_train, D)
    test = x[order[train_rows:]].to(torch.float64)  # (n_test, D)
    mean = train.mean(dim=0)  # (D,)

    basis = principal_basis(train - mean, rank)  # (D, rank)
    pca_hat = mean + (test - mean) @ basis @ basis.T  # (n_test, D)
    pca_cosine = _cosine(test, pca_hat)

    scale = (train - mean).square().mean().sqrt().clamp_min(1e-30)
    inputs = ((train - mean) / scale).to(torch.float32)  # (n_train, D)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _autoencoder(d, hidden, rank).to(x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch_size = min(batch_size, train_rows)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = inputs[torch.randint(train_rows, (batch_size,), generator=generator).to(x.device)]
        loss = F.mse_loss(model(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        test_inputs = ((test - mean) / scale).to(torch.float32)  # (n_test, D)
        ae_hat = mean + model(test_inputs).to(torch.float64) * scale  # (n_test, D)
    ae_cosine = _cosine(test, ae_hat)
    return LinearityResult(
        rank=rank,
        pca_cosine=pca_cosine,
        autoencoder_cosine=ae_cosine,
        gain=ae_cosine - pca_cosine,
        train_rows=train_rows,
        test_rows=test_rows,
    )
