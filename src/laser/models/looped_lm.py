"""A looped (weight-tied) causal language model over bytes: one or two blocks unrolled ``loops`` times.

The second domain of the experiments (the paper's open question: does the low-rank structure found on mazes
survive on language, LoopLM / Universal-Transformer style?). The model is

    h = embed(tokens)                                   # (B, L, D)
    repeat loops:                                       # the same weights every time
        for block in blocks:
            h = h + attn(norm(h))                       # causal, RoPE on q and k
            h = h + mlp(norm(h))                        # SwiGLU
    logits = head(norm(h))                              # (B, L, 256)

pre-norm (``rms_norm`` without a gain), bias-free, with the layers of :mod:`laser.models.layers`, so that each
block's sites are named like the TRM's (``blocks.0.mlp.gate_up/mm:1024``) and one site spans every loop.
``checkpoint=True`` recomputes each loop's block stack in backward (activation checkpointing per recursion
step, as the TRM does per ``net`` call).

>>> model = LoopedLM(preset("text-tiny"))
>>> tokens = torch.randint(0, 256, (2, 32))
>>> model(tokens).shape
torch.Size([2, 32, 256])
>>> model.loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from laser.models.layers import (
    Attention,
    CastedLinear,
    CosSin,
    RotaryEmbedding,
    ScaledEmbedding,
    SwiGLU,
    check_recompute,
    checkpointed,
    rms_norm,
    swiglu_inter,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoopedLMConfig:
    """Shape of a looped LM.

    vocab: token vocabulary (256 bytes; set by the text task).
    seq_len: context length in bytes (the RoPE tables' length).
    hidden, heads, expansion: width D, attention heads (head dim D / heads, even for RoPE), SwiGLU expansion.
    layers: distinct blocks, applied in order in every loop.
    loops: how many times the block stack is unrolled (recursion depth; every loop with grad).
    rope_theta: RoPE base.
    checkpoint: recompute each loop's block stack in backward.
    coded_recompute: with checkpoint, recompute through ``laser.checkpoint``: inside ``with method:`` the
        recomputed activations are stored by the method instead of raw by the checkpoint.
    forward_dtype: activation dtype ("float32", "bfloat16", "float16"); weights stay fp32.
    norm_eps: epsilon of rms_norm.
    """

    vocab: int = 256
    seq_len: int = 256
    hidden: int = 512
    heads: int = 8
    expansion: float = 4.0
    layers: int = 1
    loops: int = 24
    rope_theta: float = 10000.0
    checkpoint: bool = False
    coded_recompute: bool = False
    forward_dtype: str = "float32"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab", "seq_len", "hidden", "heads", "layers", "loops"):
            value = getattr(self, name)
            low = 2 if name == "vocab" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"LoopedLMConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"LoopedLMConfig.hidden ({self.hidden}) / heads ({self.heads}) must be an even "
                             "integer head dim for RoPE; change hidden or heads")
        check_recompute("LoopedLMConfig", self.checkpoint, self.coded_recompute)
        for name in ("expansion", "rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"LoopedLMConfig.{name} must be a finite number > 0, got {value!r}")
        if self.forward_dtype not in _DTYPES:
            raise ValueError(f"LoopedLMConfig.forward_dtype must be one of {sorted(_DTYPES)}, "
                             f"got {self.forward_dtype!r}")

    @property
    def head_dim(self) -> int:
        """Per-head width D / heads."""
        return self.hidden // self.heads

    @property
    def inter(self) -> int:
        """SwiGLU hidden width."""
        return swiglu_inter(self.hidden, self.expansion)


PRESETS: dict[str, LoopedLMConfig] = {
    # The paper's TRM width (D=512, 8 heads, SwiGLU 1536, 24 recursion steps) as a byte LM: for a GPU.
    "text-paper": LoopedLMConfig(seq_len=512),
    # Trains on one CPU core in a couple of minutes: one block of width 128 looped 4 times over 128 bytes.
    "text-quick": LoopedLMConfig(seq_len=128, hidden=128, heads=4, loops=4),
    # For tests: a forward + backward takes milliseconds.
    "text-tiny": LoopedLMConfig(seq_len=32, hidden=32, heads=2, loops=3),
}


def preset(name: str) -> LoopedLMConfig:
    """A fresh copy of the named preset config: one of ``PRESETS``."""
    if name not in PRESETS:
        raise ValueError(f"unknown looped LM preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


class Block(nn.Module):
    """Pre-norm transformer block: h = h + attn(norm(h)); h = h + mlp(norm(h))."""

    def __init__(self, cfg: LoopedLMConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn = Attention(cfg.hidden, cfg.heads, causal=True)
        self.mlp = SwiGLU(cfg.hidden, cfg.expansion)

    def forward(self, h: Tensor, cos_sin: CosSin) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        h = h + self.attn(rms_norm(h, self.eps), cos_sin)
        return h + self.mlp(rms_norm(h, self.eps))


class LoopedLM(nn.Module):
    """Looped causal byte LM: ``LoopedLM(cfg)(tokens)`` maps int64 bytes (B, L) to fp32 logits (B, L, vocab);
    the logits at position i predict byte i + 1."""

    def __init__(self, cfg: LoopedLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = _DTYPES[cfg.forward_dtype]
        self.embed = ScaledEmbedding(cfg.vocab, cfg.hidden, dtype=self.dtype)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.head = CastedLinear(cfg.hidden, cfg.vocab, bias=False)

    def _stack(self, h: Tensor, cos_sin: CosSin) -> Tensor:
        """One loop: every block once."""
        for block in self.blocks:
            h = block(h, cos_sin)
        return h

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, L) int64 bytes, L <= seq_len -> (B, L, vocab) fp32 next-byte logits."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"LoopedLM inputs must be int64 token ids of shape (B, L), got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(f"LoopedLM inputs have length {tokens.shape[1]}, more than "
                             f"LoopedLMConfig.seq_len={self.cfg.seq_len}")
        cos_sin = self.rotary(tokens.shape[1])
        h = self.embed(tokens)  # (B, L, D)
        recompute = self.cfg.checkpoint and torch.is_grad_enabled()
        for _ in range(self.cfg.loops):
            h = checkpointed(self._stack, h, cos_sin, coded=self.cfg.coded_recompute) if recompute \
                else self._stack(h, cos_sin)
        return self.head(rms_norm(h, self.cfg.norm_eps)).float()  # (B, L, V)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean next-byte cross-entropy in nats (fp32 scalar); logits (B, L, V), targets (B, L)."""
        if logits.shape[:-1] != targets.shape:
            raise ValueError(f"LoopedLM.loss: logits {tuple(logits.shape)} do not match targets "
                             f"{tuple(targets.shape)}")
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).long())
