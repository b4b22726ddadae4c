"""Scalar quantizers for saved activations and low-rank codes (pure functions, torch only).

Three families live here:

1. Per-column symmetric absmax INT8 for low-rank codes ``Z`` of shape ``(N, k)``: LASER's code columns are
   ordered by energy, so their scales differ by orders of magnitude and one scale per column is needed.
2. ActNN-style per-group min/max quantization of arbitrary activations to 2, 4 or 8 bits, bit-packed so
   that 4-bit stores two values per byte and 2-bit four, with optional unbiased stochastic rounding.
3. Simulated-quantization statistics used by the analysis tools (paper appendix A.3/A.4): INT8 round
   trips with a given scale, relative MSE, and the max-based and k-sigma-based scales.

Every function works on the input's device (CPU or CUDA), accepts fp16/bf16/fp32 inputs, computes in
fp32, and is vectorised over elements and groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

INT8_MAX = 127  # symmetric range [-127, 127]; -128 is left unused so that +x and -x quantize alike
PACK_BITS = (2, 4, 8)


# -----------------------------------------------------------------------------
# per-column symmetric INT8 for low-rank codes


def quantize_columns_int8(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize codes ``(N, k)`` to INT8 with one symmetric absmax scale per column.

    ``scale_j = max_i |Z_ij| / 127`` and ``q_ij = round(Z_ij / scale_j)``, so every element is within
    ``scale_j / 2`` of its reconstruction. An all-zero column gets the smallest normal fp32 scale and zero
    codes, so it decodes to exact zeros. Three kernels after the absmax: the division runs in fp32 whatever
    the codes' dtype, without a separate upcast.

    Returns ``(q, scales)``: an int8 tensor ``(N, k)`` and an fp32 tensor ``(k,)``, on the input's device.
    """
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (N, k), got shape {tuple(codes.shape)}")
    if not codes.is_floating_point():
        raise ValueError(f"codes must be a floating-point tensor, got dtype {codes.dtype}")
    if codes.shape[0] == 0:
        return torch.zeros(codes.shape, dtype=torch.int8, device=codes.device), torch.ones(codes.shape[1],
                                                                                           device=codes.device)
    absmax = codes.abs().amax(dim=0).float()  # (k,); exact for 16-bit codes
    scales = (absmax / INT8_MAX).clamp_min_(torch.finfo(torch.float32).tiny)  # (k,)
    # |Z / scale| <= 127 up to one rounding of the scale, so round() never leaves [-127, 127].
    q = torch.round(codes / scales).to(torch.int8)  # (N, k)
    return q, scales


def dequantize_columns_int8(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """Rebuild codes ``(N, k)`` in ``dtype`` from int8 values ``(N, k)`` and fp32 column scales ``(k,)``."""
    if q.ndim != 2 or scales.shape != (q.shape[1],):
        raise ValueError(
            f"expected q (N, k) and scales (k,), got q {tuple(q.shape)} and scales {tuple(scales.shape)}"
        )
    return (q * scales.float()).to(dtype)  # (N, k); int8 * fp32 is computed in fp32


# -----------------------------------------------------------------------------
# bit packing


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits!r}")


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack uint8 ``values`` (each ``< 2**bits``) into a flat uint8 tensor, ``8 // bits`` values a byte.

    Value ``i`` goes to byte ``i // (8 // bits)`` at bit offset ``bits * (i % (8 // bits))`` (little end
    first). The tail is padded with zeros to a whole byte; ``unpack_bits`` needs the original count.
    Values must already fit in ``bits`` bits (not checked: that would cost a device sync per call).
    For ``bits=8`` the result is the flattened input itself (a view when possible).
    """
    _check_bits(bits)
    if values.dtype != torch.uint8:
        raise ValueError(f"values must be uint8, got {values.dtype}")
    flat = values.reshape(-1)
    if bits == 8:
        return flat
    per_byte = 8 // bits
    pad = -flat.numel() % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    slots = flat.view(-1, per_byte)  # (bytes, per_byte)
    # At most four slot passes, each vectorised over all bytes; stays in uint8 to avoid a wide temporary.
    packed = slots[:, 0].clone()
    for slot in range(1, per_byte):
        packed |= slots[:, slot] << (slot * bits)
    return packed


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of ``pack_bits``: the first ``count`` values (flat uint8) stored in ``packed``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    per_byte = 8 // bits
    capacity = packed.numel() * per_byte
    if not 0 <= count <= capacity:
        raise ValueError(
            f"count must be in [0, {capacity}] for {packed.numel()} bytes at {bits} bits, got {count}"
        )
    flat = packed.reshape(-1)
    if bits == 8:
        return flat[:count]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per_byte,)
    mask = (1 << bits) - 1
    values = (flat.unsqueeze(1) >> shifts) & mask  # (bytes, per_byte)
    return values.reshape(-1)[:count]


# -----------------------------------------------------------------------------
# ActNN-style per-group quantization


@dataclass(frozen=True, eq=False)
class GroupQuantized:
    """A tensor quantized per group of ``group_size`` consecutive elements (flattened, last group padded).

    ``data`` holds the bit-packed level indices of all ``ceil(numel / group_size) * group_size`` padded
    values. ``mins`` and ``scales`` are fp32, one each per group, so metadata costs 8 bytes per group
    (0.25 bits a value at the default group of 256). fp32 rather than fp16 because an fp16 minimum would
    round the group's offset: constant groups would no longer decode exactly and tight groups (a range
    below the fp16 spacing of their offset) would see errors larger than one quantization step.
    Value ``i`` decodes to ``mins[g] + level_i * scales[g]`` with ``g = i // group_size``.
    """

    data: Tensor  # uint8, packed level indices
    mins: Tensor  # fp32 (groups,)
    scales: Tensor  # fp32 (groups,)
    bits: int
    group_size: int
    numel: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Exact bytes stored: packed data plus the per-group minimum and scale."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.mins, self.scales))


def quantize_groups(
    x: Tensor,
    bits: int,
    group_size: int = 256,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> GroupQuantized:
    """Quantize ``x`` to ``bits`` bits per element with a min/max range per group (ActNN style).

    ``x`` is flattened and the last group padded with copies of the last element (so padding never
    widens a group's range). Per group: ``scale = (max - min) / (2**bits - 1)`` and the level is
    ``(x - min) / scale`` rounded to nearest, or stochastically (``floor(v + u)``, ``u ~ U[0, 1)``),
    which is unbiased: ``E[dequantize_groups(q)] == x``. Nearest rounding errs by at most half a step,
    stochastic by less than one step. A constant group gets scale 1.0, level 0 and decodes exactly.

    ``generator`` makes stochastic rounding reproducible; the noise is drawn on the generator's device
    and moved to ``x``'s, so a CPU generator gives the same draws for CPU and CUDA inputs.
    """
    _check_bits(bits)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    levels = 2**bits - 1
    numel = x.numel()
    groups = math.ceil(numel / group_size)

    # One fp32 buffer does the upcast, the padding and (in place) the level computation.
    padded = torch.empty(groups * group_size, dtype=torch.float32, device=x.device)
    padded[:numel] = x.reshape(-1)
    if numel < padded.numel():
        padded[numel:] = padded[numel - 1]
    grouped = padded.view(groups, group_size)  # (G, S)

    mins, maxs = torch.aminmax(grouped, dim=1)  # (G,), (G,)
    scales = (maxs - mins) / levels
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # (G,)
    grouped.sub_(mins[:, None]).div_(scales[:, None])  # levels as reals in [0, levels]
    if stochastic:
        noise_device = generator.device if generator is not None else x.device
        noise = torch.rand(grouped.shape, generator=generator, device=noise_device)
        grouped.add_(noise.to(x.device)).floor_()
    else:
        grouped.round_()
    # The clamp only guards fp rounding at the range ends; for v in [0, levels] floor(v + u) stays inside.
    indices = grouped.clamp_(0, levels).to(torch.uint8)  # (G, S)

    return GroupQuantized(
        data=pack_bits(indices, bits),
        mins=mins,
        scales=scales,
        bits=bits,
        group_size=group_size,
        numel=numel,
        shape=x.shape,
        dtype=x.dtype,
    )


def dequantize_groups(qx: GroupQuantized) -> Tensor:
    """Rebuild the tensor stored in ``qx`` with its original shape and dtype (computed in fp32)."""
    groups = qx.mins.numel()
    indices = unpack_bits(qx.data, qx.bits, groups * qx.group_size)
    values = indices.view(groups, qx.group_size).to(torch.float32)  # (G, S)
    values.mul_(qx.scales[:, None]).add_(qx.mins[:, None])
    return values.view(-1)[: qx.numel].view(qx.shape).to(qx.dtype)


# -----------------------------------------------------------------------------
# simulated quantization statistics (paper appendix A.3/A.4)


def int8_symmetric(x: Tensor, scale: Tensor | float) -> Tensor:
    """Quantize then dequantize ``x`` with symmetric INT8 at ``scale`` (clamped to [-127, 127]).

    ``scale`` is a positive float or a positive tensor broadcastable to ``x`` (e.g. per column).
    Returns a tensor like ``x`` (same dtype and device); values beyond ``127 * scale`` saturate.
    """
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if not bool(torch.all(scale_t > 0)) or not bool(torch.all(torch.isfinite(scale_t))):
        raise ValueError("scale must be positive and finite (a zero tensor has no INT8 scale)")
    q = (x.to(torch.float32) / scale_t).round_().clamp_(-INT8_MAX, INT8_MAX)
    return (q * scale_t).to(x.dtype)


def relative_mse(x: Tensor, x_hat: Tensor) -> float:
    """Relative squared error ``||x - x_hat||^2 / ||x||^2`` (0.0 if both are zero, inf if only x is)."""
    if x.shape != x_hat.shape:
        raise ValueError(
            f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}"
        )
    # fp64 sums: relative errors of ~1e-4 over millions of elements need more than fp32 accumulation.
    x64 = x.to(torch.float64)
    error = (x64 - x_hat.to(torch.float64)).square().sum().item()
    energy = x64.square().sum().item()
    if energy == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / energy


def max_scale(x: Tensor) -> float:
    """Max-based INT8 scale ``max |x| / 127``: nothing clips, small values get coarse steps."""
    return x.detach().abs().max().item() / INT8_MAX


def sigma_scale(x: Tensor, k: float = 4.0) -> float:
    """Sigma-based INT8 scale ``k * std(x) / 127``: population std over all elements; beyond k-sigma clips."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return k * x.detach().to(torch.float32).std(correction=0).item() / INT8_MAX
