"""Distribution statistics and simulated quantization of activation matrices (paper A.3/A.4), and the
seed statistics of a comparison (Welch t-test, smallest detectable difference).

The activation functions take a matrix ``x`` of shape ``(N, D)`` and compute in fp64 over row chunks.
"Relative MSE" is ``||x - x_hat||^2 / ||x||^2``: the fraction of activation energy lost to the error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from laser.analysis.spectra import INT8_MAX, as_matrix, int8_round_trip, principal_basis, row_chunks

OUTLIER_KS = (2.0, 3.0, 4.0, 5.0)
SIGMA_CLIP = 4.0  # the paper's k-sigma INT8 scaling


def gaussian_tail(k: float) -> float:
    """``P(|g| > k)`` for a standard normal ``g``: ``2 (1 - Phi(k)) = erfc(k / sqrt(2))``."""
    return math.erfc(k / math.sqrt(2.0))


def _mean_std(x: Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation of all elements, by two chunked passes."""
    count = x.numel()
    mean = sum(chunk.sum().item() for chunk in row_chunks(x)) / count
    var = sum((chunk - mean).square().sum().item() for chunk in row_chunks(x)) / count
    return mean, math.sqrt(var)


def _energy(x: Tensor) -> float:
    energy = sum(chunk.square().sum().item() for chunk in row_chunks(x))
    if energy == 0:
        raise ValueError("x is all zeros: a relative error against it is undefined")
    return energy


# -----------------------------------------------------------------------------
# distribution statistics


@dataclass(frozen=True)
class ActivationStats:
    """Value distribution of one activation site (paper A.3).

    ``mean`` and ``std`` are over all ``N * D`` values (population std); ``channel_std_*`` summarise the
    ``D`` per-channel standard deviations over rows. ``outlier_rates[k]`` is the observed
    ``P(|x - mean| > k std)`` and ``gaussian_rates[k]`` its Gaussian prediction ``2 (1 - Phi(k))``.
    ``excess_kurtosis`` is ``E[(x - mean)^4] / std^4 - 3``: 0 for a Gaussian, positive for heavy tails.
    """

    n_rows: int
    dim: int
    mean: float
    std: float
    channel_std_min: float
    channel_std_max: float
    channel_std_median: float
    outlier_rates: dict[float, float]
    gaussian_rates: dict[float, float]
    excess_kurtosis: float


def activation_stats(x: Tensor) -> ActivationStats:
    """Mean, spread, per-channel spread, outlier rates and kurtosis of ``x`` ``(N, D)``."""
    x = as_matrix(x)
    n, d = x.shape
    # Centered second pass rather than E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std.
    column_sum = torch.zeros(d, dtype=torch.float64, device=x.device)
    for chunk in row_chunks(x):
        column_sum += chunk.sum(dim=0)
    column_mean = column_sum / n  # (D,)
    mean = column_sum.sum().item() / (n * d)
    column_sq = torch.zeros(d, dtype=torch.float64, device=x.device)
    total_sq = total_fourth = 0.0
    for chunk in row_chunks(x):
        column_sq += (chunk - column_mean).square().sum(dim=0)
        centered = (chunk - mean).square()
        total_sq += centered.sum().item()
        total_fourth += centered.square().sum().item()
    std = math.sqrt(total_sq / (n * d))
    if std == 0:
        raise ValueError("x is constant: outlier rates and kurtosis need a non-zero standard deviation")
    channel_std = (column_sq / n).sqrt()  # (D,)
    exceed = dict.fromkeys(OUTLIER_KS, 0)
    for chunk in row_chunks(x):
        deviation = (chunk - mean).abs()
        for k in OUTLIER_KS:
            exceed[k] += int((deviation > k * std).sum().item())
    return ActivationStats(
        n_rows=n,
        dim=d,
        mean=mean,
        std=std,
        channel_std_min=channel_std.min().item(),
        channel_std_max=channel_std.max().item(),
        channel_std_median=channel_std.median().item(),
        outlier_rates={k: count / (n * d) for k, count in exceed.items()},
        gaussian_rates={k: gaussian_tail(k) for k in OUTLIER_KS},
        excess_kurtosis=total_fourth / (n * d) / std**4 - 3.0,
    )


def histogram(x: Tensor, bins: int = 100, range_sigma: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of all values of ``x`` over ``mean +- range_sigma * std``.

    Returns ``(counts, edges)`` as numpy arrays of lengths ``bins`` (int64) and ``bins + 1`` (float64);
    values outside the range are not counted.
    """
    x = as_matrix(x)
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    if not range_sigma > 0:
        raise ValueError(f"range_sigma must be > 0, got {range_sigma!r}")
    mean, std = _mean_std(x)
    if std == 0:
        raise ValueError("x is constant: a histogram over mean +- range_sigma * std has zero width")
    low, high = mean - range_sigma * std, mean + range_sigma * std
    counts = torch.zeros(bins, dtype=torch.float64, device=x.device)
    for chunk in row_chunks(x):
        counts += torch.histc(chunk, bins=bins, min=low, max=high)
    edges = np.linspace(low, high, bins + 1)
    return counts.round().cpu().numpy().astype(np.int64), edges


# -----------------------------------------------------------------------------
# simulated quantization


def int8_error(x: Tensor) -> dict[str, float]:
    """Relative MSE of simulated symmetric INT8 on ``x`` ``(N, D)`` with one scale for the whole tensor.

    Two scalings, as in the paper: ``max`` (``scale = absmax / 127``, nothing clips) and ``sigma``
    (``scale = 4 std / 127``: a finer grid, values beyond 4 std clip). Returns the scales, the relative
    MSEs and the fraction of values clipped by the sigma scaling.
    """
    x = as_matrix(x)
    energy = _energy(x)
    absmax = max(chunk.abs().max().item() for chunk in row_chunks(x))
    _, std = _mean_std(x)
    scales = {"max": absmax / INT8_MAX, "sigma": SIGMA_CLIP * std / INT8_MAX}
    errors = dict.fromkeys(scales, 0.0)
    clipped = 0
    for chunk in row_chunks(x):
        for name, scale in scales.items():
            errors[name] += (chunk - int8_round_trip(chunk, scale)).square().sum().item()
        clipped += int((chunk.abs() > INT8_MAX * scales["sigma"]).sum().item())
    return {
        "scale_max": scales["max"],
        "scale_sigma": scales["sigma"],
        "relative_mse_max": errors["max"] / energy,
        "relative_mse_sigma": errors["sigma"] / energy,
        "clip_rate_sigma": clipped / x.numel(),
    }


def pca_int8_stats(x: Tensor, ranks: Sequence[int] = (64, 128, 256)) -> list[dict[str, float]]:
    """Statistics of ``x`` ``(N, D)`` after rank-``k`` PCA with INT8 codes, for each ``k`` in ``ranks``.

    For each ``k <= min(N, D)`` (larger ones are skipped): ``Q`` = top-``k`` right singular vectors of
    ``x`` (uncentered, as LASER), codes ``Z = X Q`` quantized to INT8 with per-column absmax scales, and
    ``X_hat = Z_int8 Q^T``. Each row reports ``rank``, the raw and reconstructed ``mean``/``std`` (over
    all values), ``mean_shift`` = ``|mean_hat - mean| / std`` (in units of the raw std, because the mean
    is near zero and a ratio to it would be noise), ``std_change`` = ``|std_hat - std| / std``,
    ``relative_mse`` of ``X_hat`` against ``x`` and ``relative_mse_projection`` of the unquantized
    reconstruction, so their difference is what INT8 adds.
    """
    x = as_matrix(x)
    if any(not isinstance(k, int) or k < 1 for k in ranks):
        raise ValueError(f"ranks must be positive ints, got {tuple(ranks)!r}")
    kept = sorted({k for k in ranks if k <= min(x.shape)})
    if not kept:
        return []
    mean, std = _mean_std(x)
    energy = _energy(x)
    if std == 0:
        raise ValueError("x is constant: relative changes of its std are undefined")
    # The top-k basis of every smaller k is a prefix of the largest one.
    full_basis = principal_basis(x, kept[-1])  # (D, k_max)
    rows = []
    for k in kept:
        q = full_basis[:, :k]  # (D, k)
        absmax = torch.zeros(k, dtype=torch.float64, device=x.device)
        for chunk in row_chunks(x):
            absmax = torch.maximum(absmax, (chunk @ q).abs().amax(dim=0))
        scales = absmax / INT8_MAX  # (k,)
        # Sums are shifted by the raw mean, which x_hat nearly shares, so the variance does not cancel.
        shifted = shifted_sq = error = projection_error = 0.0
        for chunk in row_chunks(x):
            codes = chunk @ q  # (rows, k)
            x_hat = int8_round_trip(codes, scales) @ q.T  # (rows, D)
            shifted += (x_hat - mean).sum().item()
            shifted_sq += (x_hat - mean).square().sum().item()
            error += (chunk - x_hat).square().sum().item()
            projection_error += (chunk - codes @ q.T).square().sum().item()
        offset = shifted / x.numel()
        mean_hat = mean + offset
        std_hat = math.sqrt(max(shifted_sq / x.numel() - offset**2, 0.0))
        rows.append(
            {
                "rank": k,
                "mean": mean,
                "std": std,
                "mean_hat": mean_hat,
                "std_hat": std_hat,
                "mean_shift": abs(mean_hat - mean) / std,
                "std_change": abs(std_hat - std) / std,
                "relative_mse": error / energy,
                "relative_mse_projection": projection_error / energy,
            }
        )
    return rows


# -----------------------------------------------------------------------------
# seed statistics: is a difference between two methods larger than their seeds can tell?

WELCH_TEST = "Welch t-test (two-sided, unequal variances) over seeds"


def _sample_variance(values: Sequence[float]) -> float:
    mean = math.fsum(values) / len(values)
    return math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)


def welch_df(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Welch-Satterthwaite degrees of freedom of ``a`` against ``b``.

    ``(s_a^2/n_a + s_b^2/n_b)^2 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))`` with sample variances;
    None with fewer than 2 values in either, or no spread in both (0/0).
    """
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = _sample_variance(a) / len(a), _sample_variance(b) / len(b)
    if va == 0 and vb == 0:
        return None
    va, vb = va / max(va, vb), vb / max(va, vb)  # scale-free: tiny variances' squares would underflow
    return (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))


def min_detectable_difference(
    a: Sequence[float], b: Sequence[float], alpha: float = 0.05, power: float = 0.8
) -> float | None:
    """Smallest difference of means a two-sided Welch t-test at ``alpha`` detects with probability ``power``
    at the seeds' spread: ``(t_{1-alpha/2, df} + t_{power, df}) * sqrt(s_a^2/n_a + s_b^2/n_b)``, ``df`` the
    Welch-Satterthwaite degrees of freedom and ``s`` the sample standard deviations.

    None when undefined: fewer than 2 seeds in either arm (no spread to estimate), or no spread in both.
    """
    from scipy import stats

    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha={alpha} and power={power} must both lie in (0, 1)")
    df = welch_df(a, b)
    if df is None:
        return None
    se = math.sqrt(_sample_variance(a) / len(a) + _sample_variance(b) / len(b))
    return float(stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * se


@dataclass(frozen=True)
class SeedDifference:
    """``mean(a) - mean(b)`` with its Welch test and the smallest difference the seeds could detect.

    ``p_value`` and ``min_detectable`` are None when undefined; ``note`` then says why. ``told_apart``: the
    seeds tell the two apart: ``|difference| >= min_detectable`` (which implies ``p_value < alpha``); with no
    spread in either arm (every seed agreeing exactly) any non-zero difference; with a single seed in either
    arm, never.
    """

    difference: float
    p_value: float | None
    min_detectable: float | None
    told_apart: bool
    seeds: tuple[int, int]
    test: str = WELCH_TEST
    alpha: float = 0.05
    power: float = 0.8
    note: str = ""

    @property
    def significant(self) -> bool:
        """Whether Welch's test rejects equal means at ``alpha`` (False where there is no test). A significant
        difference under ``min_detectable`` is one these seeds detect less than ``power`` of the time."""
        return self.p_value is not None and self.p_value < self.alpha


def seed_difference(
    a: Sequence[float], b: Sequence[float], alpha: float = 0.05, power: float = 0.8
) -> SeedDifference:
    """Compare the per-seed values ``a`` of one method with ``b`` of another (see :class:`SeedDifference`).

    The p-value is Welch's: ``t = (mean(a) - mean(b)) / sqrt(s_a^2/n_a + s_b^2/n_b)``, two-sided, on the
    Welch-Satterthwaite degrees of freedom, the same ``df`` as :func:`min_detectable_difference`'s.
    """
    from scipy import stats

    a, b = [float(v) for v in a], [float(v) for v in b]
    if not a or not b:
        raise ValueError(f"need at least one value on each side, got {len(a)} and {len(b)}")
    difference = math.fsum(a) / len(a) - math.fsum(b) / len(b)
    seeds = (len(a), len(b))
    if min(seeds) < 2:
        return SeedDifference(difference, None, None, False, seeds, alpha=alpha, power=power,
                              note="1 seed: no test, so the seeds cannot tell any difference apart")
    mdd = min_detectable_difference(a, b, alpha, power)
    if mdd is None:
        return SeedDifference(difference, None, None, difference != 0, seeds, alpha=alpha, power=power,
                              note="no spread across seeds in either method, so no t-test")
    se = math.sqrt(_sample_variance(a) / len(a) + _sample_variance(b) / len(b))
    p = float(2 * stats.t.sf(abs(difference) / se, welch_df(a, b)))
    return SeedDifference(difference, p, mdd, abs(difference) >= mdd, seeds, alpha=alpha, power=power)
