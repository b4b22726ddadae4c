"""Tiny Recursive Model (TRM, Jolicoeur-Martineau 2025), the model the LASER paper trains on mazes.

One small stack of post-norm transformer blocks (`net`) is applied over and over. The model keeps two
states of shape (B, L, D): the answer `y` and the latent `z`. One recursion cycle is

    repeat L_cycles:  z = net(z, y + x)     # refine the latent from answer + input
    y = net(y, z)                           # refine the answer from the latent

where net(h, inj) runs the blocks on h + inj and x is the embedded input. The first H_cycles - 1 cycles
run without grad; only the last is backpropagated through. Deep supervision repeats the whole thing
n_sup times, carrying (y, z) over detached; `forward_carry` is one such step.

Faithful to the reference `models/recursive_reasoning/trm.py` with these differences, all because the
maze task has no puzzle identifiers: no puzzle embedding positions, and the optional halting head reads
the mean of y over positions (the reference reads the first puzzle-embedding position).
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
    local_heads_bias,
    rms_norm,
    swiglu_inter,
    trunc_normal_,
)

PATH_TOKEN = 4  # maze token for a cell on the solution path (laser.data.maze: wall, passage, start, goal, path)
HALT_LOSS_WEIGHT = 0.5  # the reference adds 0.5 * halting BCE to the token loss
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TRMConfig:
    """Shape and training options of a TRM. Defaults are the LASER paper's maze model (see `preset`).

    vocab, seq_len: token vocabulary and sequence length (11x11 maze: 5 tokens, 121 cells).
    hidden, heads, expansion: width D, attention heads (head dim D/heads), SwiGLU expansion.
    L_layers: blocks in `net` (weight-tied across all recursion steps).
    H_cycles, L_cycles: recursion cycles (all but the last without grad) and latent updates per cycle.
    rope, rope_theta: rotary positions; rope=False uses learned absolute positions (the reference's
        "learned" option).
    rope_2d: rotary positions over the (row, column) of a square grid (seq_len must be a square and the
        head dim divisible by 4) instead of the flat index; grid tasks learn relative moves much sooner.
    local_heads: the first local_heads attention heads of every block see only a cell and its 4 neighbours of the
        square grid (seq_len must be a square); the others see everything. A local rule that can be applied
        again at every recursion step, as cellular automata and flood fills are.
    checkpoint: recompute each `net` call of the grad cycle in backward (activation checkpointing).
    coded_recompute: with checkpoint, recompute through `laser.checkpoint`: inside `with method:` the
        recomputed activations are stored by the method (codes) instead of raw by the checkpoint; outside,
        the same as torch's checkpoint.
    n_sup: deep-supervision steps; `forward` runs all of them, only the last with grad.
    act: add the halting head (halt logit per sequence, BCE target: whole sequence correct).
    stablemax: stablemax cross-entropy instead of softmax (the reference's option for small data).
    forward_dtype: activation dtype of the forward ("float32", "bfloat16" or "float16"); weights stay fp32.
    path_weight: loss weight on cells whose target is PATH (4); other cells weigh 1.
    norm_eps: epsilon of rms_norm.
    """

    vocab: int = 5
    seq_len: int = 121
    hidden: int = 512
    heads: int = 8
    expansion: float = 4.0
    L_layers: int = 1
    H_cycles: int = 1
    L_cycles: int = 24
    rope: bool = True
    rope_theta: float = 10000.0
    rope_2d: bool = False
    local_heads: int = 0
    checkpoint: bool = False
    coded_recompute: bool = False
    n_sup: int = 1
    act: bool = False
    stablemax: bool = False
    forward_dtype: str = "float32"
    path_weight: float = 1.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab", "seq_len", "hidden", "heads", "L_layers", "H_cycles", "L_cycles", "n_sup"):
            value = getattr(self, name)
            low = 2 if name == "vocab" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TRMConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(
                f"TRMConfig.hidden ({self.hidden}) must be divisible by TRMConfig.heads ({self.heads})"
            )
        if self.rope and self.head_dim % 2:
            raise ValueError(
                f"TRMConfig.hidden / TRMConfig.heads (head dim {self.head_dim}) must be even for RoPE; "
                "change hidden or heads, or set rope=False"
            )
        if self.rope_2d and (not self.rope or self.side is None or self.head_dim % 4):
            raise ValueError(
                f"TRMConfig.rope_2d needs rope=True, a square seq_len and a head dim divisible by 4; got "
                f"rope={self.rope}, seq_len={self.seq_len}, head dim {self.head_dim}; set rope_2d=False "
                "or change seq_len/hidden/heads"
            )
        if isinstance(self.local_heads, bool) or not isinstance(self.local_heads, int) \
                or not 0 <= self.local_heads <= self.heads:
            raise ValueError(f"TRMConfig.local_heads must be an integer in [0, heads={self.heads}], "
                             f"got {self.local_heads!r}")
        if self.local_heads and self.side is None:
            raise ValueError(f"TRMConfig.local_heads needs a square grid, but seq_len={self.seq_len} is not a "
                             "square; set local_heads=0 or change seq_len")
        check_recompute("TRMConfig", self.checkpoint, self.coded_recompute)
        for name in ("expansion", "rope_theta", "path_weight", "norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"TRMConfig.{name} must be a finite number > 0, got {value!r}")
        if self.forward_dtype not in _DTYPES:
            raise ValueError(
                f"TRMConfig.forward_dtype must be one of {sorted(_DTYPES)}, got {self.forward_dtype!r}"
            )

    @property
    def side(self) -> int | None:
        """Side of the square grid the sequence lays out in row-major order (seq_len a square), else None."""
        side = math.isqrt(self.seq_len)
        return side if side * side == self.seq_len else None

    @property
    def grid(self) -> int | None:
        """Side of the square grid 2D RoPE positions index (rope_2d), else None."""
        return self.side if self.rope_2d else None

    @property
    def head_dim(self) -> int:
        """Per-head width D / heads."""
        return self.hidden // self.heads

    @property
    def inter(self) -> int:
        """SwiGLU hidden width."""
        return swiglu_inter(self.hidden, self.expansion)


PRESETS: dict[str, TRMConfig] = {
    # The LASER paper's maze model (its Table 3): 3,412,992 parameters.
    "paper": TRMConfig(),
    # The paper's shape at a width and depth a 2-core CPU trains in well under a second per batch of 32.
    "paper-cpu": TRMConfig(hidden=128, heads=4, L_cycles=8),
    # Small enough to learn 11x11 mazes on a CPU in minutes, with deep supervision.
    "quick": TRMConfig(hidden=64, heads=2, L_cycles=4, H_cycles=2, n_sup=4),
    # For tests: a forward + backward takes milliseconds.
    "tiny": TRMConfig(hidden=32, heads=2, L_cycles=2),
}


def preset(name: str) -> TRMConfig:
    """A fresh copy of the named preset config: one of `PRESETS` ("paper", "paper-cpu", "quick", "tiny")."""
    if name not in PRESETS:
        raise ValueError(f"unknown TRM preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements of `model` (each shared parameter once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def log_stablemax(logits: Tensor, dim: int = -1) -> Tensor:
    """log of stablemax(x)_i = s(x_i) / sum_j s(x_j), s(x) = x + 1 for x >= 0 and 1 / (1 - x) below.

    Stablemax grows linearly, not exponentially, so huge logits cannot overflow (Prieto et al. 2025, used
    by the TRM reference). Computed in float64 as in the reference.
    """
    x = logits.double()
    s = torch.where(x < 0, 1 / (1 - x), x + 1)
    return torch.log(s / s.sum(dim=dim, keepdim=True))


def token_weights(targets: Tensor, path_weight: float = 1.0) -> Tensor:
    """Loss weight of every cell: `path_weight` where the target is PATH, else 1. (B, L) fp32."""
    return torch.where(targets == PATH_TOKEN, path_weight, 1.0).float()


def token_loss(logits: Tensor, targets: Tensor, path_weight: float = 1.0, stablemax: bool = False,
               normalizer: Tensor | float | None = None) -> Tensor:
    """Weighted mean cross-entropy over all tokens: cells whose target is PATH weigh `path_weight`,
    others 1, and the weights are normalised so the loss is a weighted mean.

    logits: (B, L, V), targets: (B, L) int. Returns an fp32 scalar. `normalizer` replaces the sum of this
    batch's weights: a data-parallel rank passes the global sum divided by the number of ranks, so the mean
    of the ranks' losses (and gradients) is the weighted mean over the global batch.
    """
    if stablemax:
        logprobs = log_stablemax(logits)  # (B, L, V) float64
        ce = -logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (B, L)
    else:
        ce = F.cross_entropy(logits.float().transpose(1, 2), targets.long(), reduction="none")  # (B, L)
    weights = token_weights(targets, path_weight).to(ce.dtype)  # (B, L)
    total = weights.sum() if normalizer is None else normalizer
    return ((weights * ce).sum() / total).float()


@dataclass
class TRMCarry:
    """The recursive state handed from one supervision step to the next: answer `y` and latent `z`,
    each (B, L, D)."""

    y: Tensor
    z: Tensor


class Block(nn.Module):
    """Post-norm transformer block of the reference: h = norm(h + attn(h)); h = norm(h + mlp(h))."""

    def __init__(self, cfg: TRMConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        bias = local_heads_bias(cfg.side, cfg.heads, cfg.local_heads) if cfg.local_heads else None
        self.attn = Attention(cfg.hidden, cfg.heads, bias=bias)
        self.mlp = SwiGLU(cfg.hidden, cfg.expansion)

    def forward(self, h: Tensor, cos_sin: CosSin | None) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        h = rms_norm(h + self.attn(h, cos_sin), self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


class TRM(nn.Module):
    """Tiny Recursive Model: `TRM(cfg)(inputs)` maps int64 tokens (B, L) to fp32 logits (B, L, vocab).

    `forward` gives the answer after all `cfg.n_sup` supervision steps, only the last with grad. To train
    with deep supervision as the reference does, call `forward_carry` n_sup times on the same batch and
    take an optimiser step after each; the carry comes back detached, so each backward stays within
    its own step:

    >>> model = TRM(preset("tiny"))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> inputs = torch.randint(0, 5, (2, 121)); targets = torch.randint(0, 5, (2, 121))
    >>> carry = None
    >>> for _ in range(model.cfg.n_sup):
    ...     carry, logits, halt_logits = model.forward_carry(inputs, carry)
    ...     model.loss(logits, targets, halt_logits).backward()
    ...     opt.step(); opt.zero_grad()
    """

    def __init__(self, cfg: TRMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = _DTYPES[cfg.forward_dtype]
        D = cfg.hidden
        self.embed = ScaledEmbedding(cfg.vocab, D, dtype=self.dtype)
        if cfg.rope:
            self.rotary = RotaryEmbedding(cfg.head_dim, cfg.seq_len, cfg.rope_theta, grid=cfg.grid)
        else:
            self.pos = nn.Parameter(trunc_normal_(torch.empty(cfg.seq_len, D), std=1.0 / math.sqrt(D)))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.L_layers))
        self.head = CastedLinear(D, cfg.vocab, bias=False)
        if cfg.act:
            self.halt_head = CastedLinear(D, 1, bias=True)
            # Start near "never halt" so early training is not cut short (the reference's Q-head init).
            nn.init.zeros_(self.halt_head.weight)
            nn.init.constant_(self.halt_head.bias, -5.0)
        # Learned-at-init but fixed starting states, like the reference's H_init / L_init.
        self.register_buffer("y_init", trunc_normal_(torch.empty(D), std=1.0))
        self.register_buffer("z_init", trunc_normal_(torch.empty(D), std=1.0))

    def init_carry(self, batch: int, length: int) -> TRMCarry:
        """The starting state for a fresh batch: y_init and z_init at every position."""
        shape = (batch, length, self.cfg.hidden)
        return TRMCarry(y=self.y_init.to(self.dtype).expand(shape), z=self.z_init.to(self.dtype).expand(shape))

    def _embed(self, inputs: Tensor) -> Tensor:
        """(B, L) tokens -> (B, L, D) input injection x."""
        if self.cfg.rope:
            return self.embed(inputs)
        # Scale the sum by 1/sqrt(2) to keep unit variance, as the reference does for learned positions.
        pos = self.pos[: inputs.shape[1]].to(self.dtype) * self.embed.scale
        return (self.embed(inputs) + pos) / math.sqrt(2)

    def _net(self, h: Tensor, cos_sin: CosSin | None) -> Tensor:
        """The weight-tied block stack."""
        for block in self.blocks:
            h = block(h, cos_sin)
        return h

    def _call_net(self, h: Tensor, injection: Tensor, cos_sin: CosSin | None, recompute: bool) -> Tensor:
        """`_net` on h + injection, under activation checkpointing when `recompute` (its activations are rebuilt
        in backward instead of saved). The sum is made outside the checkpointed region: the region then keeps
        one input per call, not two (the add saves nothing for its backward)."""
        h = h + injection
        if recompute:
            return checkpointed(self._net, h, cos_sin, coded=self.cfg.coded_recompute)
        return self._net(h, cos_sin)

    def _cycle(self, y: Tensor, z: Tensor, x: Tensor, cos_sin: CosSin | None) -> tuple[Tensor, Tensor]:
        """One recursion cycle: L_cycles latent updates, then one answer update."""
        recompute = self.cfg.checkpoint and torch.is_grad_enabled()
        for _ in range(self.cfg.L_cycles):
            z = self._call_net(z, y + x, cos_sin, recompute)
        y = self._call_net(y, z, cos_sin, recompute)
        return y, z

    def forward_carry(
        self, inputs: Tensor, carry: TRMCarry | None = None
    ) -> tuple[TRMCarry, Tensor, Tensor | None]:
        """One supervision step: H_cycles recursion cycles from `carry` (None: a fresh start).

        Returns the detached new carry, fp32 logits (B, L, vocab), and fp32 halt logits (B,) when
        cfg.act (else None). It runs through `__call__` (`self(inputs, carry, step=True)`), so module
        hooks see the call: what is saved at the model's own level (the per-step inputs kept by activation
        checkpointing) then belongs to the model, not to code outside it.
        """
        return self(inputs, carry, step=True)

    def _supervision_step(self, inputs: Tensor, carry: TRMCarry | None) -> tuple[TRMCarry, Tensor, Tensor | None]:
        """The body of `forward_carry`."""
        if inputs.ndim != 2 or inputs.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"TRM inputs must be int64 token ids of shape (B, L), got {inputs.dtype} {tuple(inputs.shape)}"
            )
        batch, length = inputs.shape
        if length > self.cfg.seq_len:
            raise ValueError(
                f"TRM inputs have length {length}, more than TRMConfig.seq_len={self.cfg.seq_len}"
            )
        if carry is None:
            carry = self.init_carry(batch, length)
        cos_sin = self.rotary(length) if self.cfg.rope else None
        x = self._embed(inputs)  # (B, L, D)
        y, z = carry.y, carry.z
        with torch.no_grad():
            for _ in range(self.cfg.H_cycles - 1):
                y, z = self._cycle(y, z, x, cos_sin)
        y, z = self._cycle(y, z, x, cos_sin)
        logits = self.head(y).float()  # (B, L, V)
        halt_logits = self.halt_head(y.mean(dim=1)).float().squeeze(-1) if self.cfg.act else None  # (B,)
        return TRMCarry(y=y.detach(), z=z.detach()), logits, halt_logits

    def forward(
        self, inputs: Tensor, carry: TRMCarry | None = None, *, step: bool = False
    ) -> Tensor | tuple[TRMCarry, Tensor, Tensor | None]:
        """(B, L) int64 tokens -> (B, L, vocab) fp32 logits after all n_sup supervision steps, the first
        n_sup - 1 without grad. With `step=True`, one supervision step from `carry` (see `forward_carry`)."""
        if step:
            return self._supervision_step(inputs, carry)
        with torch.no_grad():
            for _ in range(self.cfg.n_sup - 1):
                carry, _, _ = self._supervision_step(inputs, carry)
        _, logits, _ = self._supervision_step(inputs, carry)
        return logits

    def loss(self, logits: Tensor, targets: Tensor, halt_logits: Tensor | None = None,
             normalizer: Tensor | float | None = None) -> Tensor:
        """Training loss of one supervision step, an fp32 scalar.

        Token cross-entropy (stablemax if cfg.stablemax) as a weighted mean with PATH cells weighing
        cfg.path_weight (`normalizer`: see `token_loss`); with cfg.act, plus 0.5 * BCE of `halt_logits`
        against "every cell of the sequence is predicted right".
        """
        if logits.shape[:-1] != targets.shape:
            raise ValueError(
                f"TRM.loss: logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}"
            )
        if self.cfg.act != (halt_logits is not None):
            raise ValueError("TRM.loss: pass halt_logits exactly when TRMConfig.act is True")
        loss = token_loss(logits, targets, self.cfg.path_weight, self.cfg.stablemax, normalizer)
        if halt_logits is not None:
            solved = (logits.detach().argmax(-1) == targets).all(-1).to(halt_logits.dtype)  # (B,)
            loss = loss + HALT_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(halt_logits, solved)
        return loss
