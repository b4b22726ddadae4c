"""Spectra of activation matrices and the paper's oracle PCA fidelity (section 3.1, Figure 4).

Every function takes an activation matrix ``x`` of shape ``(N, D)``: ``N`` rows are tokens pooled over
batch, sequence and recursion steps, ``D`` is the width of the compression site. The math runs in fp64
over row chunks, so a large fp32/bf16 matrix is never copied whole into fp64.

PCA here is *uncentered*, exactly like LASER's codes ``Z = X Q`` (Proposition 1 of the paper): the basis
``Q`` is the top right singular vectors of ``X`` itself, and the fidelity ``||Z||_F / ||X||_F`` is the
cosine between ``X`` and its reconstruction ``X_hat = Z Q^T``. TRM activations are near zero-mean, so the
centered and uncentered spectra nearly coincide; callers that want centered PCA subtract the mean first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

INT8_MAX = 127  # symmetric range [-127, 127], as in laser.quant
CODE_BITS = (None, 8, 16, 32)
SUMMARY_RANKS = (32, 64, 128, 256)
# Largest width for which the D x D Gram route is used: eigvalsh of a 4096 x 4096 fp64 matrix takes
# seconds and 128 MiB, while an SVD of the (N, D) matrix would cost O(N D^2) with an N x D fp64 copy.
GRAM_MAX_DIM = 4096
CHUNK_ELEMENTS = 1 << 22  # elements per row chunk converted to fp64 at a time (32 MiB)
ORTHONORMAL_TOL = 1e-3  # loose enough for fp32/bf16-built bases, tight enough to catch a wrong input


# -----------------------------------------------------------------------------
# input checks and chunking


def as_matrix(x: Tensor, name: str = "x") -> Tensor:
    """Check that ``x`` is a non-empty floating-point ``(N, D)`` tensor and return it detached."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N rows, D channels), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")
    return x.detach()


def row_chunks(x: Tensor) -> Iterator[Tensor]:
    """Yield consecutive row blocks of ``x`` converted to fp64, each about ``CHUNK_ELEMENTS`` elements."""
    rows = max(1, CHUNK_ELEMENTS // x.shape[1])
    for start in range(0, x.shape[0], rows):
        yield x[start : start + rows].to(torch.float64)  # (rows, D)


def _check_orthonormal(basis: Tensor, name: str) -> None:
    gram = basis.T @ basis  # (k, k)
    error = (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max().item()
    if error > ORTHONORMAL_TOL:
        raise ValueError(
            f"{name} must have orthonormal columns (max |Q^T Q - I| = {error:.2e} > {ORTHONORMAL_TOL}); "
            "orthonormalise it first, e.g. with torch.linalg.qr"
        )


# -----------------------------------------------------------------------------
# singular values and principal directions


def _gram(x: Tensor) -> Tensor:
    """``X^T X`` in fp64, accumulated over row chunks."""
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)  # (D, D)
    for chunk in row_chunks(x):
        gram += chunk.T @ chunk
    return gram


def _use_gram(x: Tensor) -> bool:
    # The Gram route squares the condition number, so singular values below ~1e-8 * s_max are lost to
    # fp64 rounding; that is far below anything an energy spectrum or a fidelity can see.
    n, d = x.shape
    return d <= n and d <= GRAM_MAX_DIM


def singular_values(x: Tensor) -> Tensor:
    """Singular values of ``x`` ``(N, D)``, descending, as an fp64 tensor of length ``min(N, D)``.

    When ``D <= N`` and ``D <= GRAM_MAX_DIM`` they are the square roots of the eigenvalues of the fp64
    Gram matrix ``X^T X`` (accumulated in row chunks: cost O(N D^2), memory O(D^2), no N x D fp64 copy).
    Otherwise (wide or very wide matrices) they come from ``torch.linalg.svdvals`` on an fp64 copy.
    """
    x = as_matrix(x)
    if _use_gram(x):
        eigenvalues = torch.linalg.eigvalsh(_gram(x))  # (D,), ascending
        return eigenvalues.clamp_min(0).sqrt().flip(0)
    return torch.linalg.svdvals(x.to(torch.float64))


def principal_basis(x: Tensor, rank: int) -> Tensor:
    """Top-``rank`` right singular vectors of ``x`` ``(N, D)`` as an orthonormal fp64 ``(D, rank)`` basis.

    Columns are ordered by singular value, largest first. Uses the same Gram-or-SVD choice as
    ``singular_values``. ``rank`` must be in ``[1, min(N, D)]``.
    """
    x = as_matrix(x)
    limit = min(x.shape)
    if not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank must be an int in [1, min(N, D)] = [1, {limit}], got {rank!r}")
    if _use_gram(x):
        _, vectors = torch.linalg.eigh(_gram(x))  # (D, D), columns by ascending eigenvalue
        return vectors[:, -rank:].flip(1).contiguous()
    _, _, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)  # vh: (min(N, D), D)
    return vh[:rank].T.contiguous()


# -----------------------------------------------------------------------------
# energy spectra


def _check_spectrum(sv: Tensor) -> Tensor:
    if not isinstance(sv, Tensor) or sv.ndim != 1 or sv.numel() == 0:
        raise ValueError("sv must be a non-empty 1-D tensor of singular values")
    if (sv < 0).any():
        raise ValueError("sv must be non-negative (singular values)")
    energy = sv.to(torch.float64).square()
    if energy.sum() == 0:
        raise ValueError("sv is all zeros: the energy fractions of a zero matrix are undefined")
    return energy


def cumulative_energy(sv: Tensor) -> Tensor:
    """Fraction of ``sum(sv**2)`` captured by the top ``i`` singular values, for ``i = 1..len(sv)``.

    ``sv`` is sorted descending first, so the result is non-decreasing and ends at 1 (fp64).
    """
    energy = _check_spectrum(sv).sort(descending=True).values
    return energy.cumsum(0) / energy.sum()


def effective_rank(sv: Tensor, energy: float = 0.95) -> int:
    """Smallest ``k`` whose top-``k`` singular values capture at least ``energy`` of ``sum(sv**2)``."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    fractions = cumulative_energy(sv)
    # The slack keeps energy=1.0 reachable despite rounding in the cumulative sum.
    target = torch.tensor(energy - 1e-12, dtype=torch.float64, device=fractions.device)
    return min(int(torch.searchsorted(fractions, target).item()) + 1, fractions.numel())


# -----------------------------------------------------------------------------
# oracle fidelity (Figure 4)


def int8_round_trip(x: Tensor, scale: Tensor | float) -> Tensor:
    """Simulated symmetric INT8: ``clamp(round(x / scale), -127, 127) * scale``.

    ``scale`` broadcasts against ``x`` (a float, or e.g. one scale per column). Where the scale is 0 the
    output is 0: an absmax scale is 0 only for an all-zero column, which then round-trips exactly.
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x / safe).round().clamp(-INT8_MAX, INT8_MAX) * scale


def quantize_codes(codes: Tensor, bits: int | None, int8_scales: Tensor | None = None) -> Tensor:
    """Round-trip low-rank codes ``(N, k)`` through the storage precision ``bits``.

    ``None`` or ``32``: unchanged; ``16``: a bf16 cast (what LASER stores under autocast); ``8``: per-column
    symmetric absmax INT8 (code columns are ordered by energy, so their scales differ by orders of
    magnitude). ``int8_scales`` ``(k,)`` overrides the per-column scales, which default to
    ``absmax / 127`` of ``codes``; pass the scales of the whole matrix when quantizing it in row chunks.
    The result has the dtype of ``codes``.
    """
    if bits not in CODE_BITS:
        raise ValueError(f"bits must be one of {CODE_BITS} (None or 32 = no quantization), got {bits!r}")
    if bits is None or bits == 32:
        return codes
    if bits == 16:
        return codes.to(torch.bfloat16).to(codes.dtype)
    if int8_scales is None:
        int8_scales = codes.abs().amax(dim=0) / INT8_MAX  # (k,)
    return int8_round_trip(codes, int8_scales)


def pca_fidelity(x: Tensor, rank: int, bits: int | None = None, basis: Tensor | None = None) -> float:
    """Cosine between ``x`` ``(N, D)`` and its rank-``rank`` reconstruction ``X_hat = Z Q^T``.

    ``Q`` is the top-``rank`` right singular vectors of ``x`` (the paper's oracle: the basis recomputed
    exactly for this batch) or the first ``rank`` columns of a given orthonormal ``basis`` ``(D, >= rank)``.
    The codes ``Z = X Q`` are round-tripped through ``bits`` (see ``quantize_codes``). Because ``Q`` is
    orthonormal, ``<X, Z' Q^T> = <Z, Z'>`` and ``||Z' Q^T|| = ||Z'||``, so no ``N x D`` reconstruction is
    formed; with ``bits=None`` the result equals ``||Z||_F / ||X||_F`` (Proposition 1).
    """
    x = as_matrix(x)
    if basis is None:
        q = principal_basis(x, rank)  # (D, rank)
    else:
        if basis.ndim != 2 or basis.shape[0] != x.shape[1]:
            raise ValueError(f"basis must have shape (D={x.shape[1]}, k), got {tuple(basis.shape)}")
        if not isinstance(rank, int) or not 1 <= rank <= basis.shape[1]:
            raise ValueError(f"rank must be an int in [1, {basis.shape[1]}] (the basis width), got {rank!r}")
        q = basis[:, :rank].to(device=x.device, dtype=torch.float64)
        _check_orthonormal(q, "basis")
    int8_scales = None
    if bits == 8:
        # Per-column scales need the absmax over all rows before any chunk can be quantized.
        absmax = torch.zeros(rank, dtype=torch.float64, device=x.device)  # (rank,)
        for chunk in row_chunks(x):
            absmax = torch.maximum(absmax, (chunk @ q).abs().amax(dim=0))
        int8_scales = absmax / INT8_MAX
    inner = stored_energy = x_energy = 0.0
    for chunk in row_chunks(x):
        codes = chunk @ q  # (rows, rank)
        stored = quantize_codes(codes, bits, int8_scales)  # (rows, rank)
        inner += (codes * stored).sum().item()
        stored_energy += stored.square().sum().item()
        x_energy += chunk.square().sum().item()
    if x_energy == 0:
        raise ValueError("x is all zeros: the reconstruction cosine is undefined")
    if stored_energy == 0:
        return 0.0
    return inner / math.sqrt(x_energy * stored_energy)


# -----------------------------------------------------------------------------
# summaries and subspace angles


@dataclass(frozen=True)
class SpectrumSummary:
    """Spectrum of one activation site.

    ``effective_ranks`` maps an energy fraction (e.g. 0.95) to the smallest rank that captures it;
    ``energy_at_rank`` maps a rank (32, 64, 128, 256 where ``<= min(N, D)``) to the energy it captures.
    """

    dim: int
    n_rows: int
    singular_values: Tensor
    effective_ranks: dict[float, int]
    energy_at_rank: dict[int, float]


def summarize(x: Tensor, energies: Sequence[float] = (0.95, 0.99)) -> SpectrumSummary:
    """Singular values, effective ranks at ``energies`` and energy captured at the standard ranks."""
    x = as_matrix(x)
    sv = singular_values(x)
    fractions = cumulative_energy(sv)
    return SpectrumSummary(
        dim=x.shape[1],
        n_rows=x.shape[0],
        singular_values=sv,
        effective_ranks={float(e): effective_rank(sv, e) for e in energies},
        energy_at_rank={r: fractions[r - 1].item() for r in SUMMARY_RANKS if r <= sv.numel()},
    )


def principal_angles(q1: Tensor, q2: Tensor) -> Tensor:
    """Principal angles in radians, ascending, between the column spans of orthonormal ``q1``, ``q2``.

    ``q1`` is ``(D, k1)`` and ``q2`` is ``(D, k2)``; the result has ``min(k1, k2)`` entries in
    ``[0, pi/2]``: the arccos of the singular values of ``q1^T q2``, clamped to ``[0, 1]`` against
    rounding. Accuracy is about ``1e-16 / angle`` for small angles (arccos is flat near 1).
    """
    if q1.ndim != 2 or q2.ndim != 2 or q1.shape[0] != q2.shape[0]:
        shapes = f"{tuple(q1.shape)} and {tuple(q2.shape)}"
        raise ValueError(f"q1 and q2 must be (D, k1) and (D, k2) with the same D, got {shapes}")
    a = q1.to(torch.float64)
    b = q2.to(device=a.device, dtype=torch.float64)
    _check_orthonormal(a, "q1")
    _check_orthonormal(b, "q2")
    cosines = torch.linalg.svdvals(a.T @ b).clamp(0, 1)  # (min(k1, k2),), descending
    return torch.arccos(cosines)
