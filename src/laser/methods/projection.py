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
from laser.hooks import ActivationMethod, Packed, SiteAccount, autocast_off, tensor_bytes
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

    def decode(self) -> torch.Tensor:
        compute = self.basis.dtype
        with autocast_off(self.codes.device):
            if self.scales is None:
                codes = self.codes.to(compute)
            else:
                codes = dequantize_columns_int8(self.codes, self.scales, compute)
            return (codes @ self.basis.T).to(self.dtype).reshape(-1)  # (N*D,)


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


def pays(x: torch.Tensor, rank: int, quantize: str | None, dtype: torch.dtype, basis_share: float = 1.0,
         basis_dtype: torch.dtype = torch.float32) -> bool:
    """Whether codes of ``rank`` columns for ``x`` (N, D) plus ``basis_share`` of the basis cost less than ``x``."""
    return breaks_even(x.shape[0], x.shape[1], rank, _element_bytes(dtype), _code_bytes(quantize, dtype), basis_share,
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
        self._sums: dict[str, torch.Tensor] = {}  # site -> (3,) fp32: <x, x_hat>, ||x||^2, ||x_hat||^2
        self._ranks: dict[str, int] = {}

    def measure(self, site: str, dot: torch.Tensor, x_sq: torch.Tensor, x_hat_sq: torch.Tensor,
                rank: int) -> None:
        """Add one encoded tensor's inner products to its site's sums; ``rank`` is what the report shows."""
        sums = torch.stack((dot, x_sq, x_hat_sq)).float()
        self._sums[site] = self._sums[site] + sums if site in self._sums else sums
        self._ranks[site] = rank

    def fidelity(self, site: str) -> float:
        """Cosine between the step's activations at ``site`` and their reconstructions (1.0 if none)."""
        if site not in self._sums:
            return 1.0
        dot, x_sq, x_hat_sq = self._sums[site].tolist()
        if x_sq == 0.0 or x_hat_sq == 0.0:
            return 1.0 if x_sq == x_hat_sq else 0.0
        return dot / (math.sqrt(x_sq) * math.sqrt(x_hat_sq))

    def site_row(self, site: str, account: SiteAccount) -> SiteReport:
        return SiteReport(site, account.dim, self._ranks.get(site, account.dim), self.fidelity(site),
                          account.raw_bytes, account.stored_bytes, account.tensors, fallbacks=account.fallbacks)

    def step(self) -> None:
        super().step()
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

    def basis(self, x: torch.Tensor, site: str) -> torch.Tensor:
        """The (D, k) orthonormal fp32 basis to encode ``x`` (N, D) fp32 at ``site`` with."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, site: str) -> Packed | None:
        cfg = self.config
        rank = min(cfg.rank, x.shape[1])
        if not pays(x, rank, cfg.quantize, x.dtype):
            return None
        xf = x.float()  # (N, D); no copy for fp32 activations
        x_sq = squared_norm(xf)
        if not torch.isfinite(x_sq):
            return None  # never build a basis from, or store codes of, NaN/Inf
        basis = self.basis(xf, site)  # (D, k)
        codes = xf @ basis  # (N, k) fp32
        codes_sq = squared_norm(codes)
        self.measure(site, codes_sq, x_sq, codes_sq, rank)
        record = make_codes(codes, basis, x.dtype, cfg.quantize)
        if self.per_tensor_basis:
            # The basis lives and dies with this record: charge it here rather than once per site and step.
            record.nbytes += tensor_bytes(basis)
            record.shared = ()
        return record

    def extra_state(self) -> dict:
        return {"bases": dict(self.bases)}

    def load_extra_state(self, state: dict) -> None:
        self.bases = dict(state["bases"])
