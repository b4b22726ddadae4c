"""Low-rank codes against a basis: the storage format shared by laser, static, sketch and oracle.

Also the small bases of the comparison methods: :class:`MeasuredMethod` (per-site fidelity of the step,
report rows) and :class:`FixedBasisMethod` (codes against a basis that is never tracked: ``static``,
``sketch``, ``oracle``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from laser.config import ProjectionConfig, SiteFilter
from laser.hooks import ActivationMethod, Packed, Reason, SiteAccount, autocast_off, tensor_bytes
from laser.quant import dequantize_columns_int8, quantize_columns_int8
from laser.report import SiteReport
from laser.subspace import breaks_even


class LowRankCodes(Packed):
    """A storage kept as codes ``Z`` (N, k) against a basis ``Q`` (D, k): ``X_hat = Z Q^T``.

    The record holds the very basis its codes were made with, so a basis update between forward and
    backward never changes what backward sees (DESIGN hard part 4). Reconstruction runs in the basis's
    dtype: an fp32 basis rebuilds in fp32 and casts to ``dtype`` (the reference path), a bf16 basis
    rebuilds bf16 activations with one bf16 matmul and no cast.
    """

    def __init__(self, codes: torch.Tensor, basis: torch.Tensor, dtype: torch.dtype,
                 scales: torch.Tensor | None = None) -> None:
        nbytes = tensor_bytes(codes) + (tensor_bytes(scales) if scales is not None else 0)
        super().__init__(nbytes, shared=(basis,))
        self.codes, self.basis, self.dtype, self.scales = codes, basis, dtype, scales

    factored = True
    column_decode = True

    def stored_codes(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """The codes of ``rows`` as backward will see them (dequantized, cast) in ``dtype``: (N, k)."""
        if self.scales is None:
            return self.codes[rows].to(dtype)
        return dequantize_columns_int8(self.codes[rows], self.scales, dtype)

    def factors(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stored_codes(self.basis.dtype, slice(first, first + count)), self.basis

    def decode(self) -> torch.Tensor:
        with autocast_off(self.codes.device):
            return (self.stored_codes(self.basis.dtype) @ self.basis.T).to(self.dtype).reshape(-1)  # (N*D,)

    def decode_columns(self, first: int, end: int) -> torch.Tensor:
        with autocast_off(self.codes.device):
            return (self.stored_codes(self.basis.dtype) @ self.basis[first:end].T).to(self.dtype)  # (N, end-first)


class CosineSums:
    """Running sums ``<x, y>``, ``||x||^2``, ``||y||^2`` over a step's tensors at one site; the one fidelity sum.

    The cosine between what a site saw and what backward gets back is ``dot / sqrt(x_sq * y_sq)``. For
    codes against an orthonormal basis, ``<X, Z Q^T> = ||Z||^2``, so adding ``(codes_sq, x_sq, codes_sq)``
    gives ``||Z|| / ||X||`` (Proposition 1). The sums are 0-d fp32 device tensors: adding never waits.
    """

    __slots__ = ("dot", "x_sq", "y_sq")

    def __init__(self) -> None:
        self.dot = self.x_sq = self.y_sq = None

    def add(self, dot: torch.Tensor, x_sq: torch.Tensor, y_sq: torch.Tensor) -> None:
        """Add one tensor's inner products."""
        if self.x_sq is None:
            self.dot, self.x_sq, self.y_sq = dot, x_sq, y_sq
        else:
            self.dot, self.x_sq, self.y_sq = self.dot + dot, self.x_sq + x_sq, self.y_sq + y_sq

    def cosine(self) -> float:
        """The cosine (1.0 with nothing added, or when both sides are zero; 0.0 when only one is)."""
        if self.x_sq is None:
            return 1.0
        return cosine_of(*torch.stack((self.dot, self.x_sq, self.y_sq)).tolist())


def read_sums(sums: list[CosineSums]) -> list[tuple[float, float, float]]:
    """``(dot, x_sq, y_sq)`` of each of ``sums`` (every one with something added), one read per device for all."""
    values: list[tuple[float, float, float] | None] = [None] * len(sums)
    devices: dict[torch.device, list[int]] = {}
    for i, s in enumerate(sums):
        devices.setdefault(s.x_sq.device, []).append(i)
    for members in devices.values():
        read = torch.stack([torch.stack((sums[i].dot, sums[i].x_sq, sums[i].y_sq)) for i in members]).tolist()
        for i, triple in zip(members, read, strict=True):
            values[i] = tuple(triple)
    return values


def cosine_of(dot: float, x_sq: float, y_sq: float) -> float:
    """``dot / sqrt(x_sq * y_sq)`` capped at 1 (1.0 when both sides are zero; 0.0 when only one is)."""
    if x_sq == 0.0 or y_sq == 0.0:
        return 1.0 if x_sq == y_sq else 0.0
    return min(1.0, dot / (math.sqrt(x_sq) * math.sqrt(y_sq)))


def stored_sums(codes: torch.Tensor, record: LowRankCodes) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(<Z, Z_stored>, ||Z_stored||^2)`` where rounding (int8, a narrower dtype) changed the codes; else None."""
    if record.scales is None and record.codes.dtype == codes.dtype:
        return None
    stored = record.stored_codes(torch.float32).reshape(-1)
    return torch.dot(codes.float().reshape(-1), stored), torch.dot(stored, stored)


def add_stored(sums: CosineSums, x_sq: torch.Tensor, codes_sq: torch.Tensor, codes: torch.Tensor,
               record: LowRankCodes) -> None:
    """Add one coded tensor to a site's sums of what backward gets back (after int8 or dtype rounding)."""
    rounded = stored_sums(codes, record)
    if rounded is None:
        sums.add(codes_sq, x_sq, codes_sq)
    else:
        sums.add(rounded[0], x_sq, rounded[1])


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||_F^2`` as a 0-d fp32 tensor without an elementwise temporary.

    fp32: a dot of the flat view. Other dtypes: a norm reduced in fp32 (a dot would round the sum to the
    input's precision, too coarse for a fidelity threshold near 1).
    """
    flat = x.reshape(-1)
    if flat.dtype == torch.float32:
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(flat, dtype=torch.float32).square()


def make_codes(codes: torch.Tensor, basis: torch.Tensor, dtype: torch.dtype,
               quantize: str | None) -> LowRankCodes:
    """Store codes (N, k) in ``dtype`` (the activation's) or as per-column int8, against ``basis``."""
    if quantize == "int8":
        q, scales = quantize_columns_int8(codes)
        return LowRankCodes(q, basis, dtype, scales)
    return LowRankCodes(codes.to(dtype), basis, dtype)


def pays(rows: int, dim: int, rank: int, quantize: str | None, dtype: torch.dtype, basis_share: float = 1.0,
         basis_dtype: torch.dtype = torch.float32) -> bool:
    """Whether codes of ``rank`` columns for ``rows`` x ``dim`` activations of ``dtype`` plus ``basis_share``
    bases (dim x rank of ``basis_dtype``) cost less than the activations (:func:`laser.subspace.breaks_even`)."""
    return breaks_even(rows, dim, rank, _element_bytes(dtype), _code_bytes(quantize, dtype), basis_share,
                       basis_dtype.itemsize)


def never_pays(dim: int, rank: int, quantize: str | None, dtype: torch.dtype) -> bool:
    """Whether codes of ``rank`` columns cost at least the raw row whatever the number of rows."""
    return rank * _code_bytes(quantize, dtype) >= dim * _element_bytes(dtype)


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _code_bytes(quantize: str | None, dtype: torch.dtype) -> int:
    """Bytes per stored code element: int8 codes, or codes in the activation dtype."""
    return 1 if quantize == "int8" else _element_bytes(dtype)


class MeasuredMethod(ActivationMethod):
    """A method that reports, per site and step, the cosine between what it saw and what backward gets.

    :meth:`encode` calls :meth:`measure` with ``<x, x_hat>``, ``||x||^2`` and ``||x_hat||^2`` of every tensor
    it encodes; the site's fidelity is ``sum <x, x_hat> / sqrt(sum ||x||^2 * sum ||x_hat||^2)`` over the
    step's encoded tensors (1.0 where the step stored everything raw). For an orthonormal basis
    ``<x, x_hat> = ||x_hat||^2 = ||Z||^2``, so this is ``||Z|| / ||X||`` (Proposition 1). The sums stay on
    the device until a report is built, so encoding never waits on them.
    """

    def __init__(self, model: nn.Module, config: SiteFilter) -> None:
        super().__init__(model, config)
        self._sums: dict[str, CosineSums] = {}
        self._ranks: dict[str, int] = {}

    def sums(self, site: str, rank: int) -> CosineSums:
        """The site's sums of the step, to add an encoded tensor to; ``rank`` is what the report shows."""
        self._ranks[site] = rank
        if site not in self._sums:
            self._sums[site] = CosineSums()
        return self._sums[site]

    def fidelity(self, site: str) -> float:
        """Cosine between the step's activations at ``site`` and their reconstructions (1.0 if none)."""
        return self._sums[site].cosine() if site in self._sums else 1.0

    def site_row(self, site: str, account: SiteAccount) -> SiteReport:
        return SiteReport(site, account.dim, self._ranks.get(site, account.dim), self.fidelity(site),
                          account.raw_bytes, account.stored_bytes, account.tensors, fallbacks=account.fallbacks,
                          reasons=dict(account.reasons), factored=account.factored)

    def clear_step(self) -> None:
        self._sums.clear()
        self._ranks.clear()


class FixedBasisMethod(MeasuredMethod):
    """Codes ``Z = X Q`` against a basis that is never tracked; a subclass says where ``Q`` comes from.

    Shared by ``static``, ``sketch`` and ``oracle``: break-even (a tensor whose codes plus basis would not
    beat its raw bytes is stored raw and counted as a fallback, as in laser), non-finite tensors kept raw,
    the fidelity ``||Z|| / ||X||`` per site and step, and the per-site bases in :meth:`state_dict`.

    Attributes:
        bases: the (D, k) fp32 basis of each site that keeps one (``static``, ``sketch``).
        per_tensor_basis: every record owns its basis (``oracle``): its bytes are charged to that record,
            not once per site and step.
    """

    name = "fixed"
    per_tensor_basis = False

    def __init__(self, model: nn.Module, config: ProjectionConfig | None = None) -> None:
        config = config if config is not None else ProjectionConfig()
        if not isinstance(config, ProjectionConfig):
            raise TypeError(f"config must be a ProjectionConfig, got {type(config).__name__}")
        super().__init__(model, config)
        self.bases: dict[str, torch.Tensor] = {}

    def basis(self, x: torch.Tensor, site: str, rank: int) -> torch.Tensor:
        """The (D, ``rank``) orthonormal fp32 basis to encode ``x`` (N, D) fp32 at ``site`` with."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, site: str) -> Packed | str:
        cfg = self.config
        rank = min(cfg.rank_for(site), x.shape[1])
        if not pays(*x.shape, rank, cfg.quantize, x.dtype):
            return Reason.BREAK_EVEN
        xf = x.float()  # (N, D); no copy for fp32 activations
        x_sq = squared_norm(xf)
        if not torch.isfinite(x_sq):
            return Reason.NONFINITE  # never build a basis from, or store codes of, NaN/Inf
        basis = self.basis(xf, site, rank)  # (D, k)
        codes = xf @ basis  # (N, k) fp32
        record = make_codes(codes, basis, x.dtype, cfg.quantize)
        add_stored(self.sums(site, rank), x_sq, squared_norm(codes), codes, record)
        if self.per_tensor_basis:
            # The basis lives and dies with this record: charge it here rather than once per site and step.
            record.nbytes += tensor_bytes(basis)
            record.shared = ()
        return record

    def extra_state(self) -> dict:
        return {"bases": dict(self.bases)}

    def load_extra_state(self, state: dict) -> None:
        self.bases = dict(state["bases"])
