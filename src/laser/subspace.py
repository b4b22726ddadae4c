"""Basis math as pure functions: orthonormalisation, power iteration, expansion, reset, break-even.

Every basis here is a ``(D, k)`` fp32 matrix with orthonormal columns, ordered by the energy the data put
on each column (the first column carries the most). Activations are ``(N, D)`` matrices: one row per token
(batch x sequence x recursion step), ``D`` the width of the site.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Exact SVD is used for top-k bases while N * D * min(N, D) stays under this many multiply-adds;
# past it a randomized range finder with the same generator is as accurate for the leading directions
# and orders of magnitude faster on a CPU.
EXACT_SVD_FLOPS = 2e9


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run small CPU decompositions on one thread.

    MKL's threaded LAPACK (QR, eigh, SVD) spin-waits between tiny parallel regions; on a busy 2-core
    machine a 128 x 128 eigh measured 1.1 s with two threads and 0.7 ms with one. These matrices are
    too small to gain from threads, so they always run on one.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def orthonormalize(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column span of ``m`` (D, k), columns ordered by the energy of ``m``.

    QR gives an orthonormal basis; a small k x k eigensolve of ``R R^T`` then rotates it so the first
    column is the direction along which ``m`` is largest. The sign of each column is fixed (largest entry
    positive) so the result is a deterministic function of ``m``.
    """
    with one_thread():
        q, r = torch.linalg.qr(m.float())  # (D, k), (k, k)
        _, rotation = torch.linalg.eigh(r @ r.T)  # eigenvalues ascending
    q = q @ rotation.flip(-1)
    return _fix_signs(q)


def _fix_signs(q: torch.Tensor) -> torch.Tensor:
    pivot = q.abs().argmax(dim=0)  # (k,)
    signs = torch.sign(q.gather(0, pivot[None, :]))
    signs[signs == 0] = 1.0
    return q * signs


def power_step(accumulator: torch.Tensor) -> torch.Tensor:
    """One matrix-free power-iteration step: ``Q_new = orth(M)`` with ``M = sum_i X_i^T (X_i Q_old)``.

    ``M`` is accumulated during the forward pass from codes that are computed anyway, so the covariance
    ``X^T X`` is never formed.
    """
    return orthonormalize(accumulator)


def top_k_basis(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The top-``k`` right singular vectors of ``x`` (N, D) as a (D, k) fp32 basis (the reset step).

    Exact SVD for small inputs, a randomized range finder (oversampling 8, two power iterations, seeded
    by ``generator``) for large ones. Where ``x`` has fewer than ``k`` independent directions the basis is
    completed with random orthonormal directions, so it always has ``k`` columns.
    """
    n, d = x.shape
    k = min(k, d)
    xf = x.float()
    available = min(n, d)
    with one_thread():
        if n * d * available <= EXACT_SVD_FLOPS:
            _, _, vh = torch.linalg.svd(xf, full_matrices=False)  # vh (min(N,D), D)
            basis = vh[: min(k, available)].T
        else:
            basis = _randomized_top_k(xf, min(k, available), generator)
        if basis.shape[1] < k:
            basis = complete_basis(basis, k, generator)
    return _fix_signs(basis)


def _randomized_top_k(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    n, d = x.shape
    width = min(k + 8, d, n)
    probe = torch.randn(d, width, generator=generator, device="cpu").to(x.device)  # (D, w)
    range_basis, _ = torch.linalg.qr(x @ probe)  # (N, w)
    for _ in range(2):
        range_basis, _ = torch.linalg.qr(x @ (x.T @ range_basis))
    _, _, vh = torch.linalg.svd(range_basis.T @ x, full_matrices=False)  # (w, D)
    return vh[:k].T


def complete_basis(basis: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend an orthonormal (D, j) basis to (D, k) with random directions orthogonal to it."""
    d, j = basis.shape
    if k > d:
        raise ValueError(f"cannot build {k} orthonormal columns in dimension {d}")
    extra = torch.randn(d, k - j, generator=generator, device="cpu").to(basis.device)
    extra = _project_out(extra, basis)
    with one_thread():
        q, _ = torch.linalg.qr(extra)
    return torch.cat([basis, q], dim=1)


def _project_out(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove from the columns of ``vectors`` their component in span(basis), twice for stability."""
    for _ in range(2):
        vectors = vectors - basis @ (basis.T @ vectors)
    return vectors


def expand(basis: torch.Tensor, rows: torch.Tensor, max_rank: int) -> torch.Tensor:
    """Grow ``basis`` (D, k) by the directions of sampled activation ``rows`` (m, D) it misses.

    Implements Algorithm 1 lines 15-17: ``R_perp = R - R Q Q^T`` and ``Q <- orth([Q | R_perp^T])``. Rows
    already inside the span (residual below 1e-6 of the row norm) add nothing; the result never exceeds
    ``max_rank`` columns (nor D). The existing columns are kept unchanged, so codes made with the old
    basis stay meaningful in the first k columns.
    """
    d, k = basis.shape
    room = min(max_rank, d) - k
    if room <= 0 or rows.numel() == 0:
        return basis
    residual = _project_out(rows.float().T, basis)  # (D, m)
    scale = rows.float().norm(dim=1).clamp_min(1e-30)
    keep = residual.norm(dim=0) > 1e-6 * scale
    residual = residual[:, keep][:, :room]
    if residual.shape[1] == 0:
        return basis
    with one_thread():
        new_columns, r = torch.linalg.qr(residual)
    independent = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    new_columns = _project_out(new_columns[:, independent], basis)
    new_columns = new_columns / new_columns.norm(dim=0, keepdim=True)
    return torch.cat([basis, new_columns], dim=1)


def fidelity(codes_sq: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """``F = ||Z||_F / ||X||_F`` from squared norms; equals cos(X, Z Q^T) for orthonormal Q (Prop. 1)."""
    return (codes_sq / x_sq.clamp_min(torch.finfo(torch.float32).tiny)).sqrt().clamp(max=1.0)


def breaks_even(rows: int, dim: int, rank: int, activation_bytes: int, code_bytes: float,
                basis_share: float = 1.0, basis_bytes: int = 4) -> bool:
    """True when storing codes (rows x rank) and a share of the basis (dim x rank) beats the raw rows.

    ``code_bytes`` is the bytes per code element (2 for bf16, 1 for int8), ``basis_bytes`` per basis element
    (4 for an fp32 basis, 2 for the bf16 copy bf16 codes are made with). One basis serves every tensor of a
    site in a step, so each is charged ``basis_share`` of it (1.0, the whole basis, is the conservative
    choice when the number of tensors is not known).
    """
    return rows * rank * code_bytes + dim * rank * basis_bytes * basis_share < rows * dim * activation_bytes


def sample_rows(
    x: torch.Tensor,
    count: int,
    generator: torch.Generator,
    kept: torch.Tensor | None = None,
    kept_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform sample without replacement of ``count`` rows over a stream of (N, D) matrices.

    Each row draws a random key; the ``count`` rows with the largest keys seen so far form the sample
    (priority sampling). Pass the returned ``(rows, keys)`` back in with the next matrix of the stream.
    Keys are drawn on the CPU from ``generator`` so the sample is reproducible on any device.

    Once ``count`` rows are kept, ``kept`` is updated in place: only rows that enter the sample are
    copied (into the slots of the rows they displace), so a tensor costs O(N) key work on the CPU and
    O(entering rows x D) on the device, not a copy of the whole sample. Rows are in no particular order;
    :func:`top_rows` gives the ones with the largest keys.
    """
    keys = torch.rand(x.shape[0], generator=generator)
    new_keys, new_index = torch.topk(keys, min(count, x.shape[0]))
    if kept is None or len(kept_keys) < count:
        rows = x[to_device(new_index, x.device)].float()
        if kept is None:
            return rows, new_keys
        rows, keys = torch.cat([kept, rows]), torch.cat([kept_keys, new_keys])
        if keys.numel() > count:
            top = torch.topk(keys, count).indices
            rows, keys = rows[to_device(top, rows.device)], keys[top]
        return rows, keys
    top = torch.topk(torch.cat([kept_keys, new_keys]), count).indices
    entering = top[top >= count] - count  # positions in new_index
    if entering.numel() == 0:
        return kept, kept_keys
    staying = torch.zeros(count, dtype=torch.bool)
    staying[top[top < count]] = True
    slots = (~staying).nonzero().squeeze(1)  # as many as enter
    kept[to_device(slots, kept.device)] = x[to_device(new_index[entering], x.device)].float()
    kept_keys[slots] = new_keys[entering]
    return kept, kept_keys


def top_rows(rows: torch.Tensor, keys: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` rows of a :func:`sample_rows` sample with the largest keys: a uniform sample of that size."""
    top = torch.topk(keys, min(count, keys.numel())).indices
    return rows[to_device(top, rows.device)]


def to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without making the host wait for the device.

    A plain copy from pageable host memory to a GPU synchronises the stream; from pinned memory with
    ``non_blocking`` it is queued behind the kernels already launched (the caching host allocator keeps
    the pinned block alive until the copy has run).
    """
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)
