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
    """Orthonormal basis of the column span of ``m`` (D, k), columns ordered by the energy of ``m``; a batch
    (B, D, k) gives one per matrix, in one QR and one eigensolve call.

    QR gives an orthonormal basis; a small k x k eigensolve of ``R R^T`` then rotates it so the first
    column is the direction along which ``m`` is largest. The sign of each column is fixed (largest entry
    positive) so the result is a deterministic function of ``m``.
    """
    with one_thread():
        q, r = torch.linalg.qr(m.float())  # (..., D, k), (..., k, k)
        _, rotation = torch.linalg.eigh(r @ r.mT)  # eigenvalues ascending
    q = q @ rotation.flip(-1)
    return _fix_signs(q)


def _fix_signs(q: torch.Tensor) -> torch.Tensor:
    pivot = q.abs().argmax(dim=-2, keepdim=True)  # (..., 1, k)
    signs = torch.sign(q.gather(-2, pivot))
    signs[signs == 0] = 1.0
    return q * signs


def power_step(accumulator: torch.Tensor) -> torch.Tensor:
    """One matrix-free power-iteration step: ``Q_new = orth(M)`` with ``M = sum_i X_i^T (X_i Q_old)``.

    ``M`` is accumulated during the forward pass from codes that are computed anyway, so the covariance
    ``X^T X`` is never formed.
    """
    return orthonormalize(accumulator)


def power_steps(accumulators: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`power_step` of every accumulator, those of one shape and device as one batch: a step's sites
    share few shapes, and on an accelerator each small decomposition is a launch (and a wait) of its own."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(accumulators):
        groups.setdefault((tuple(m.shape), m.device), []).append(i)
    bases: list[torch.Tensor | None] = [None] * len(accumulators)
    for members in groups.values():
        for i, basis in zip(members, orthonormalize(torch.stack([accumulators[i] for i in members])), strict=True):
            bases[i] = basis
    return bases


def with_memory(accumulator: torch.Tensor, basis: torch.Tensor, memory: torch.Tensor | None,
                weight: float) -> torch.Tensor:
    """The step's statistic ``M = sum X^T (X Q)`` (D, k) plus ``weight`` times the earlier steps' one, carried
    as ``memory`` (k, k) in the coordinates of ``basis`` (D, k): ``M + weight * Q @ memory``.

    A power step on it tracks the top-k subspace of the decayed sum of the steps' covariances (restricted to
    the span already tracked) instead of the last step's alone: where consecutive steps see different
    distributions (a deep-supervision step that restarts from a fixed state, every few steps), the basis
    keeps the directions of all of them. ``memory`` None, a shape of an earlier rank, or ``weight`` 0: ``M``.
    """
    if memory is None or weight == 0.0 or memory.shape != (basis.shape[1], accumulator.shape[1]):
        return accumulator
    return accumulator.addmm(basis, memory, alpha=weight)


def memory_in(new_basis: torch.Tensor, combined: torch.Tensor, old_basis: torch.Tensor) -> torch.Tensor:
    """``combined`` (D, k_old), a statistic made against ``old_basis`` (D, k_old), carried into the coordinates
    of ``new_basis`` (D, k_new) as a (k_new, k_new) memory for :func:`with_memory`.

    ``combined`` approximates ``C Q_old`` for a covariance ``C``; against the new basis that is
    ``C Q_new ~ C Q_old Q_old^T Q_new``, kept as its coordinates in ``Q_new``:
    ``(Q_new^T combined) (Q_old^T Q_new)``. What lies outside the new span is dropped, so the memory costs
    k x k, not D x k; where the new basis spans ``combined`` (after a power step) nothing is lost.
    """
    return (new_basis.T @ combined) @ (old_basis.T @ new_basis)


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


def rank_for_error(x: torch.Tensor, max_error: float) -> int:
    """The smallest rank whose top-k SVD reconstructs ``x`` (N, D) with relative error ``||X - X_k|| / ||X||``
    at most ``max_error`` (Eckart-Young: the error is the root of the discarded share of ``sum s_i^2``)."""
    with one_thread():
        energy = torch.linalg.svdvals(x.double()).square()
    if energy.sum() == 0:
        return 1
    discarded = 1.0 - energy.cumsum(0) / energy.sum()  # after keeping 1, 2, ... columns
    return int((discarded > max_error**2).sum()) + 1


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


# Up to this many kept rows, a full sample is merged with a matrix's keys in Python: a handful of floats
# cost less than the dozen small tensor ops of the general path (the host time bounds an accelerator).
SMALL_SAMPLE = 64


def sample_rows(
    x: torch.Tensor,
    count: int,
    generator: torch.Generator,
    kept: torch.Tensor | None = None,
    kept_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform sample without replacement of ``count`` rows over a stream of (N, D) matrices.

    Priority sampling: every row carries a uniform random key and the ``count`` rows with the largest keys
    seen so far form the sample. Pass the returned ``(rows, keys)`` back in with the next matrix of the
    stream. Only a matrix's largest keys are drawn, in decreasing order, as order statistics of N uniforms
    (``K_1 = U_1^(1/N)``, ``K_j = K_{j-1} U_j^(1/(N-j+1))``), and the rows they belong to are a uniformly
    random subset of the matrix's rows (for iid keys, which rows hold the largest ones is independent of
    their values). Once the sample is full, a matrix whose largest key would not enter it costs one
    random draw on the CPU and no device work, which is most matrices of a long stream; rows that enter
    are copied into the slots of the rows they displace. Keys are drawn on the CPU from ``generator``, so
    the sample is reproducible on any device. Rows are in no particular order: :func:`top_rows` gives the
    ones with the largest keys.
    """
    n = x.shape[0]
    if n == 0:  # nothing to draw from
        if kept is not None:
            return kept, kept_keys
        return x.new_zeros((0, x.shape[1]), dtype=torch.float32), torch.zeros(0, dtype=torch.float64)
    take = min(count, n)
    full = kept is not None and len(kept_keys) >= count
    first = torch.rand(1, generator=generator, dtype=torch.float64)
    if full and count <= SMALL_SAMPLE:
        return _merge_small(x, generator, kept, kept_keys, float(first))
    if full and float(first) ** (1.0 / n) <= float(kept_keys.min()):
        return kept, kept_keys
    uniforms = torch.cat([first, torch.rand(take - 1, generator=generator, dtype=torch.float64)])
    new_keys = torch.cumprod(uniforms ** (1.0 / torch.arange(n, n - take, -1, dtype=torch.float64)), 0)
    if full:
        new_keys = new_keys[new_keys > kept_keys.min()]
    rows = x[to_device(_distinct_rows(n, len(new_keys), generator), x.device)].float()
    if kept is None:
        return rows, new_keys
    if not full:
        rows, keys = torch.cat([kept, rows]), torch.cat([kept_keys, new_keys])
        if keys.numel() > count:
            top = torch.topk(keys, count).indices
            rows, keys = rows[to_device(top, rows.device)], keys[top]
        return rows, keys
    top = torch.topk(torch.cat([kept_keys, new_keys]), count).indices
    entering = top[top >= count] - count  # positions in new_keys / rows
    staying = torch.zeros(count, dtype=torch.bool)
    staying[top[top < count]] = True
    slots = (~staying).nonzero().squeeze(1)  # as many as enter
    kept[to_device(slots, kept.device)] = rows[to_device(entering, rows.device)]
    kept_keys[slots] = new_keys[entering]
    return kept, kept_keys


def _merge_small(x: torch.Tensor, generator: torch.Generator, kept: torch.Tensor, kept_keys: torch.Tensor,
                 first: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_rows` into a full sample of at most :data:`SMALL_SAMPLE` rows, keys handled in Python."""
    n, count = x.shape[0], len(kept_keys)
    keys = kept_keys.tolist()
    floor = min(keys)
    key = first ** (1.0 / n)
    if key <= floor:
        return kept, kept_keys
    new = [key]
    for j, u in enumerate(torch.rand(min(count, n) - 1, generator=generator, dtype=torch.float64).tolist(), 1):
        key *= u ** (1.0 / (n - j))
        if key <= floor:
            break
        new.append(key)
    ranked = sorted([(k, i) for i, k in enumerate(keys)] + [(k, count + j) for j, k in enumerate(new)],
                    reverse=True)[:count]
    staying = {i for _, i in ranked if i < count}
    slots = [i for i in range(count) if i not in staying]
    entering = [i - count for _, i in ranked if i >= count]  # as many as slots
    rows = _distinct_rows(n, len(new), generator)
    kept[to_device(torch.tensor(slots), kept.device)] = x[to_device(rows[entering], x.device)].float()
    kept_keys[slots] = torch.tensor([new[j] for j in entering], dtype=kept_keys.dtype)
    return kept, kept_keys


def _distinct_rows(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct row indices of ``range(n)`` in uniformly random order (a random ordered subset).

    Drawn position by position, each uniform over the rows not drawn yet (redrawing repeats), so a few rows
    of a large matrix cost a few draws rather than a permutation of all ``n``.
    """
    if 4 * count >= n:
        return torch.randperm(n, generator=generator)[:count]
    rows: list[int] = []
    seen: set[int] = set()
    for row in torch.randint(n, (count,), generator=generator).tolist():
        while row in seen:
            row = int(torch.randint(n, (1,), generator=generator))
        rows.append(row)
        seen.add(row)
    return torch.tensor(rows)


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
