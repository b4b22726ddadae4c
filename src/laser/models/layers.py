"""Transformer pieces of the Tiny Recursive Model (TRM), following the TRM reference code.

Everything here is bias-free and weightless where the reference is: `rms_norm` has no gain, linears have
no bias, weights start from a truncated LeCun normal. Linears and the embedding cast their fp32 weights to
the activation dtype, so a model can run its forward in bf16 while keeping fp32 master weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from laser.recompute import checkpoint as laser_checkpoint

CosSin = tuple[Tensor, Tensor]


def trunc_normal_(tensor: Tensor, std: float = 1.0, lower: float = -2.0, upper: float = 2.0) -> Tensor:
    """Fill `tensor` in place from a normal truncated to [lower, upper] standard deviations, with std `std`.

    This is JAX's truncated normal (flax's default initialiser) as the TRM reference uses it: the samples
    are scaled so that the *truncated* distribution has standard deviation `std` (torch's
    `nn.init.trunc_normal_` leaves it smaller). Sampling is by inverting the normal CDF on a uniform draw
    between the two bounds' CDF values, so no sample is ever rejected.
    """
    if std < 0:
        raise ValueError(f"trunc_normal_: std must be >= 0, got {std}")
    if not lower < upper:
        raise ValueError(f"trunc_normal_: need lower < upper, got lower={lower}, upper={upper}")
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        cdf_lo = math.erf(lower / math.sqrt(2))  # 2 * Phi(lower) - 1
        cdf_hi = math.erf(upper / math.sqrt(2))
        mass = (cdf_hi - cdf_lo) / 2  # Phi(upper) - Phi(lower)
        pdf_lo = math.exp(-0.5 * lower**2) / math.sqrt(2 * math.pi)
        pdf_hi = math.exp(-0.5 * upper**2) / math.sqrt(2 * math.pi)
        # Variance of a standard normal truncated to [lower, upper].
        trunc_var = 1 + (lower * pdf_lo - upper * pdf_hi) / mass - ((pdf_lo - pdf_hi) / mass) ** 2
        scale = std / math.sqrt(trunc_var)
        tensor.uniform_(cdf_lo, cdf_hi).erfinv_().mul_(math.sqrt(2) * scale)
        # erfinv of a value rounded to +-1 can overshoot; keep the bound exact.
        return tensor.clamp_(lower * scale, upper * scale)


def check_recompute(config: str, checkpoint: bool, coded_recompute: bool) -> None:
    """A model config's ``coded_recompute`` needs its ``checkpoint``."""
    if coded_recompute and not checkpoint:
        raise ValueError(f"{config}.coded_recompute stores what activation checkpointing recomputes; it needs "
                         "checkpoint=True (or set coded_recompute=False)")


def checkpointed(fn, *args, coded: bool):
    """``fn(*args)`` under non-reentrant activation checkpointing: ``laser.checkpoint`` when ``coded`` (inside
    ``with method:`` the method stores the recomputed activations; outside it is torch's), else
    ``torch.utils.checkpoint``."""
    if coded:
        return laser_checkpoint(fn, *args)
    return checkpoint(fn, *args, use_reentrant=False)


def rms_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Root-mean-square normalisation over the last dimension, without a learned gain.

    Computed in fp32 whatever the input dtype (a bf16 mean of squares loses too much), then cast back.
    """
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
    return x32.to(x.dtype)


def swiglu_inter(hidden: int, expansion: float) -> int:
    """Width of the SwiGLU hidden layer: 2/3 of `expansion * hidden` (the gate costs a third matrix),
    rounded up to a multiple of 256 as in the reference. `swiglu_inter(512, 4.0) == 1536`."""
    width = round(expansion * hidden * 2 / 3)
    return -(-width // 256) * 256


class CastedLinear(nn.Linear):
    """`nn.Linear` with truncated LeCun normal init (std 1/sqrt(fan_in)), zero bias, and its weight cast
    to the input's dtype in forward (fp32 master weights, low-precision compute)."""

    def reset_parameters(self) -> None:
        """Initialise like the reference: truncated LeCun normal weight, zero bias."""
        trunc_normal_(self.weight, std=1.0 / math.sqrt(self.in_features))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer in `x.dtype`, or in autocast's dtype under autocast.

        Under autocast the weight is left to autocast, which casts it once per forward and caches the copy;
        an explicit `.to(x.dtype)` would make a fresh copy at every call that backward keeps (one per
        recursion step: 2 MiB per step at the paper's shape).
        """
        if torch.is_autocast_enabled(x.device.type):
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class ScaledEmbedding(nn.Module):
    """Token embedding initialised with std 1/sqrt(D) and multiplied by sqrt(D) in forward, so the
    embedded tokens have unit scale while the stored weight stays small (the reference's CastedEmbedding
    plus its `embed_scale`)."""

    def __init__(self, vocab: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.scale = math.sqrt(dim)
        self.dtype = dtype
        self.weight = nn.Parameter(trunc_normal_(torch.empty(vocab, dim), std=1.0 / self.scale))

    def extra_repr(self) -> str:
        """Shown by print(model)."""
        vocab, dim = self.weight.shape
        return f"{vocab}, {dim}, scale={self.scale:.4g}, dtype={self.dtype}"

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, L) int token ids -> (B, L, D) embeddings in the forward dtype."""
        return self.scale * F.embedding(tokens, self.weight.to(self.dtype))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (RoPE) for `max_len` positions and head size `head_dim`.

    Uses the "rotate half" layout of the reference: channel i pairs with channel i + head_dim/2, both
    rotating at frequency theta^(-2i/head_dim). With `grid=side` the positions are the cells of a
    side x side grid in row-major order (2D RoPE): the first half of each half rotates with the row, the
    second with the column, each at frequencies theta^(-4i/head_dim), so q.k depends on the (row, column)
    offset instead of the flat distance. The tables are fp32 non-persistent buffers (recomputed on
    construction, never saved in a state dict).
    """

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0, grid: int | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even to pair channels, got {head_dim}")
        if grid is not None and head_dim % 4:
            raise ValueError(f"RotaryEmbedding: 2D (grid) positions need head_dim divisible by 4, got {head_dim}")
        if grid is not None and grid * grid != max_len:
            raise ValueError(f"RotaryEmbedding: grid={grid} needs max_len = grid * grid = {grid * grid}, got {max_len}")
        self.max_len = max_len
        self.grid = grid
        positions = torch.arange(max_len, dtype=torch.float32)
        if grid is None:
            inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
            angles = torch.outer(positions, inv_freq)  # (L, hd/2)
        else:
            quarter = head_dim // 4
            inv_freq = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32) / quarter)
            row, col = positions.div(grid, rounding_mode="floor"), positions.remainder(grid)
            angles = torch.cat((torch.outer(row, inv_freq), torch.outer(col, inv_freq)), dim=-1)  # (L, hd/2)
        angles = torch.cat((angles, angles), dim=-1)  # (L, hd)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def extra_repr(self) -> str:
        """Shown by print(model)."""
        grid = f", grid={self.grid}" if self.grid else ""
        return f"head_dim={self.cos.shape[-1]}, max_len={self.max_len}{grid}"

    def forward(self, seq_len: int) -> CosSin:
        """The (cos, sin) tables for the first `seq_len` positions, each (seq_len, head_dim)."""
        if seq_len > self.max_len:
            raise ValueError(f"RotaryEmbedding: seq_len {seq_len} exceeds max_len {self.max_len}")
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each channel pair (i, i + hd/2) of `x` (B, L, H, hd) by its position's angle.

    `cos`, `sin`: (L, hd) from `RotaryEmbedding`. Computed in the tables' dtype (fp32), cast back to
    `x.dtype`. A rotation, so per-head norms are kept and q.k depends only on the position difference.
    """
    dtype = x.dtype
    x = x.to(cos.dtype)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (L, 1, hd): broadcast over heads
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(dtype)


def grid_neighbours(side: int) -> Tensor:
    """(L, L) bool, L = side * side: True where two cells of a row-major side x side grid are the same cell or
    one step apart up, down, left or right."""
    if side < 1:
        raise ValueError(f"grid_neighbours: side must be >= 1, got {side}")
    cells = torch.arange(side * side)
    row, col = cells.div(side, rounding_mode="floor"), cells.remainder(side)
    distance = (row[:, None] - row[None, :]).abs() + (col[:, None] - col[None, :]).abs()
    return distance <= 1


def local_heads_bias(side: int, heads: int, local: int) -> Tensor:
    """Additive attention bias (heads, L, L), fp32: the first `local` heads see only a cell and its 4 grid
    neighbours (-inf elsewhere), the other heads everything (0)."""
    if not 0 <= local <= heads:
        raise ValueError(f"local_heads_bias: local heads must be in [0, {heads}], got {local}")
    bias = torch.zeros(heads, side * side, side * side)
    bias[:local].masked_fill_(~grid_neighbours(side), float("-inf"))
    return bias


class Attention(nn.Module):
    """Multi-head self-attention: fused bias-free `qkv` (D -> 3D), RoPE on q and k,
    `F.scaled_dot_product_attention`, bias-free output projection `o` (D -> D). Non-causal (the TRM) unless
    `causal` (a language model: position i attends to positions <= i). `bias`: an optional fixed additive
    attention bias (heads, L, L), e.g. `local_heads_bias`, kept as a non-persistent buffer."""

    def __init__(self, hidden: int, heads: int, causal: bool = False, bias: Tensor | None = None) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"Attention: hidden ({hidden}) must be divisible by heads ({heads})")
        if bias is not None and (causal or bias.ndim != 3 or bias.shape[0] != heads or bias.shape[1] != bias.shape[2]):
            raise ValueError(f"Attention: bias must be (heads={heads}, L, L) and needs causal=False, got "
                             f"{tuple(bias.shape)} with causal={causal}")
        self.heads, self.causal = heads, causal
        self.head_dim = hidden // heads
        self.register_buffer("bias", bias, persistent=False)
        self._cast: Tensor | None = None  # the bias in another dtype (autocast), made once
        self.qkv = CastedLinear(hidden, 3 * hidden, bias=False)
        self.o = CastedLinear(hidden, hidden, bias=False)

    def forward(self, x: Tensor, cos_sin: CosSin | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D); `cos_sin` from `RotaryEmbedding`, or None for no RoPE."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3 * self.heads, self.head_dim)  # (B, L, 3H, hd)
        q, k, v = qkv.split(self.heads, dim=2)  # each (B, L, H, hd)
        if cos_sin is not None:
            q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
        mask = None if self.bias is None else self._mask(q.dtype, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)  # (B, H, L, hd)
        return self.o(out.transpose(1, 2).reshape(B, L, D))

    def _mask(self, dtype: torch.dtype, length: int) -> Tensor:
        """The bias as a (1, H, L, L) mask in the attention's dtype. A 4D mask keeps CPU attention on its fused
        kernel (a 3D one falls back to the math path, which saves the (B, H, L, L) probabilities). A cast is made
        once and reused, so every call saves the same storage instead of a copy per recursion step."""
        bias = self.bias
        if bias.dtype != dtype:
            if self._cast is None or self._cast.dtype != dtype or self._cast.device != bias.device:
                self._cast = bias.to(dtype)
            bias = self._cast
        return bias[None, :, :length, :length]


class SwiGLU(nn.Module):
    """Gated MLP: fused bias-free `gate_up` (D -> 2I), silu(gate) * up, bias-free `down` (I -> D), with
    I = `swiglu_inter(hidden, expansion)`."""

    def __init__(self, hidden: int, expansion: float) -> None:
        super().__init__()
        self.inter = swiglu_inter(hidden, expansion)
        self.gate_up = CastedLinear(hidden, 2 * self.inter, bias=False)
        self.down = CastedLinear(self.inter, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # each (B, L, I)
        return self.down(F.silu(gate) * up)
