"""``quant``: ActNN-style per-group quantization of every saved activation to 8, 4 or 2 bits."""

from __future__ import annotations

import torch
from torch import nn

from laser.config import QuantConfig
from laser.hooks import Packed, Reason, tensor_bytes
from laser.methods.projection import MeasuredMethod
from laser.quant import GroupQuantized, dequantize_groups, quantize_groups


class GroupQuantizedRecord(Packed):
    """A storage kept as bit-packed per-group levels with an fp32 minimum and scale per group."""

    def __init__(self, quantized: GroupQuantized) -> None:
        super().__init__(quantized.nbytes)
        self.quantized = quantized

    def decode(self) -> torch.Tensor:
        return dequantize_groups(self.quantized).reshape(-1)  # (N*D,) in the activation's dtype


class QuantMethod(MeasuredMethod):
    """Stores every admitted saved activation quantized per group of ``group_size`` values (ActNN-style).

    Each group keeps its own min/max range, so one outlier spoils only its group. With ``stochastic`` the
    rounding is unbiased and draws its noise from the method's generator, so runs are reproducible and a
    resumed run continues the same noise stream. A tensor whose packed form would not be smaller than the
    raw one (tiny groups, 8-bit activations) is stored raw and counted as a fallback. The report's rank is
    the site's width; its fidelity is the cosine between each activation and its dequantized value.

    >>> method = QuantMethod(model, QuantConfig(bits=4))   # doctest: +SKIP
    >>> with method:
    ...     loss = model(x).square().mean()
    >>> loss.backward(); method.step()
    """

    name = "quant"

    def __init__(self, model: nn.Module, config: QuantConfig | None = None) -> None:
        config = config if config is not None else QuantConfig()
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
        super().__init__(model, config)

    def encode(self, x: torch.Tensor, site: str) -> Packed | str:
        cfg = self.config
        flat = x.float().reshape(-1)  # (N*D,); no copy for fp32 activations
        x_sq = torch.dot(flat, flat)
        if not torch.isfinite(x_sq):
            return Reason.NONFINITE  # a non-finite value would spoil its group's range
        quantized = quantize_groups(x, cfg.bits, cfg.group_size, cfg.stochastic, self.generator)
        if quantized.nbytes >= tensor_bytes(x):
            return Reason.BREAK_EVEN
        x_hat = dequantize_groups(quantized).float().reshape(-1)  # (N*D,)
        self.sums(site, x.shape[1]).add(torch.dot(flat, x_hat), x_sq, torch.dot(x_hat, x_hat))
        return GroupQuantizedRecord(quantized)
