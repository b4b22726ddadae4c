"""Low-rank codes against a basis: the storage format shared by laser, static, sketch and oracle."""

from __future__ import annotations

import torch

from laser.hooks import Packed, tensor_bytes
from laser.quant import dequantize_columns_int8, quantize_columns_int8
from laser.subspace import breaks_even


class LowRankCodes(Packed):
    """A storage kept as codes ``Z`` (N, k) against a basis ``Q`` (D, k): ``X_hat = Z Q^T``.

    The record holds the very basis its codes were made with, so a basis update between forward and
    backward never changes what backward sees (DESIGN hard part 4).
    """

    def __init__(self, codes: torch.Tensor, basis: torch.Tensor, dtype: torch.dtype,
                 scales: torch.Tensor | None = None) -> None:
        nbytes = tensor_bytes(codes) + (tensor_bytes(scales) if scales is not None else 0)
        super().__init__(nbytes, shared=(basis,))
        self.codes, self.basis, self.dtype, self.scales = codes, basis, dtype, scales

    def decode(self) -> torch.Tensor:
        with torch.autocast(self.codes.device.type, enabled=False):
            if self.scales is None:
                codes = self.codes.float()
            else:
                codes = dequantize_columns_int8(self.codes, self.scales, torch.float32)
            return (codes @ self.basis.T).to(self.dtype).reshape(-1)  # (N*D,)


def make_codes(codes: torch.Tensor, basis: torch.Tensor, dtype: torch.dtype,
               quantize: str | None) -> LowRankCodes:
    """Store fp32 codes (N, k) in ``dtype`` (the activation's) or as per-column int8."""
    if quantize == "int8":
        q, scales = quantize_columns_int8(codes)
        return LowRankCodes(q, basis, dtype, scales)
    return LowRankCodes(codes.to(dtype), basis, dtype)


def pays(x: torch.Tensor, rank: int, quantize: str | None, dtype: torch.dtype) -> bool:
    """Whether codes of ``rank`` columns for ``x`` (N, D) plus the basis cost less than ``x`` itself."""
    code_bytes = 1 if quantize == "int8" else torch.finfo(dtype).bits // 8
    activation_bytes = torch.finfo(dtype).bits // 8
    return breaks_even(x.shape[0], x.shape[1], rank, activation_bytes, code_bytes)


def never_pays(dim: int, rank: int, quantize: str | None, dtype: torch.dtype) -> bool:
    """Whether codes of ``rank`` columns cost at least the raw row whatever the number of rows."""
    code_bytes = 1 if quantize == "int8" else torch.finfo(dtype).bits // 8
    return rank * code_bytes >= dim * (torch.finfo(dtype).bits // 8)
