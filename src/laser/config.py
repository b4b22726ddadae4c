"""Configuration objects of the activation-memory methods, validated when they are built.

Every config is a dataclass whose ``__post_init__`` rejects impossible values with a message naming the
field, the value and what is allowed, so a bad setting fails before any training starts.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, fields


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


# Site name prefix of tensors saved while no module of the model runs (typically the loss).
OUTSIDE = "<outside>"


@dataclass(kw_only=True)
class SiteFilter:
    """Which saved activations a method may touch.

    Attributes:
        min_numel: tensors with fewer elements are stored as they are (their codes would not pay).
        min_dim: sites whose last dimension is smaller are stored as they are.
        include: glob patterns on site names (``"blocks.0.mlp*"``); when given, only matching sites.
        exclude: glob patterns on site names never touched, applied after ``include``.
        model_only: touch only tensors saved while a module of the model runs; what is saved outside it
            (the loss: a log-softmax whose errors the loss gradient amplifies) stays raw.
        exact_qk: keep the query and key that ``scaled_dot_product_attention`` saves exact (reason
            ``"attention"``). Its backward recomputes the softmax from them against a normaliser saved exactly,
            so an error in ``q k^T`` is amplified: on an untrained TRM (D=128, 2 heads, 6 recursion steps)
            coding the rotated key alone at rank 32 (fidelity 0.990) left a whole-model gradient cosine of
            0.07; keeping q and k exact: 1.000 at 0.816 saved instead of 0.854 (``python
            benchmarks/attention.py``).
        fold_to: widest row a fold may make: a storage is coded as rows of its innermost dense dimensions
            merged while the width stays <= fold_to (see :func:`laser.hooks.row_width`). With the model
            width, attention heads (B, H, L, hd) laid out as (B, L, H, hd) become rows of H*hd, one per
            token, which a rank-k basis can compress where rows of width hd <= k could not. 0: no folding.
            Off by default because it hurt where we measured it: on a trained quick-preset TRM, coding
            attention's q, k and output (errors a sharp softmax amplifies) left a gradient cosine of 0.94
            even at fidelity 0.9997 (``benchmarks/grad_probe.py``); check gradients before using it.
    """

    min_numel: int = 1024
    min_dim: int = 8
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    model_only: bool = True
    exact_qk: bool = True
    fold_to: int = 0

    def __post_init__(self) -> None:
        _check_types(self)
        _require(self.min_numel >= 0, "min_numel", self.min_numel, "must be >= 0")
        _require(self.min_dim >= 1, "min_dim", self.min_dim, "must be >= 1")
        _require(self.fold_to >= 0, "fold_to", self.fold_to, "must be >= 0 (0: no folding)")
        self.include = _patterns("include", self.include)
        self.exclude = _patterns("exclude", self.exclude)

    def admits(self, site: str) -> bool:
        """Whether the patterns and ``model_only`` let a method touch tensors of ``site`` (sizes aside)."""
        if self.model_only and site.startswith(OUTSIDE):
            return False
        if self.include and not any(fnmatch.fnmatchcase(site, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(site, p) for p in self.exclude)


_TYPES = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or None"),
    "float | None": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
                     "a number or None"),
    "int | None": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or None"),
}


def _check_types(config: object) -> None:
    """Reject a value of the wrong type with a ValueError naming the field (before any comparison)."""
    for f in fields(config):
        check = _TYPES.get(f.type)
        value = getattr(config, f.name)
        if check is not None and not check[0](value):
            raise ValueError(f"{f.name}={value!r} is invalid: must be {check[1]}")


def _patterns(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = tuple(p for p in value.split(";") if p)
    _require(
        isinstance(value, (tuple, list)) and all(isinstance(p, str) for p in value),
        name,
        value,
        "must be a tuple of glob patterns (or one string, patterns separated by ';')",
    )
    return tuple(value)


def _site_ranks(value: object) -> tuple[str, ...]:
    """``site_ranks`` as a tuple of ``"pattern=rank"`` entries (one string: entries separated by ';')."""
    entries = (value,) if isinstance(value, str) else value
    _require(isinstance(entries, (tuple, list)) and all(isinstance(e, str) for e in entries), "site_ranks", value,
             "must be 'pattern=rank' entries, e.g. ('*mlp.down*=64',) or one string '*mlp.down*=64;*attn*=16'")
    parsed = []
    for entry in (e.strip() for part in entries for e in part.split(";")):
        if not entry:
            continue
        pattern, sep, rank = entry.rpartition("=")
        _require(bool(sep and pattern) and rank.strip().isdigit() and int(rank) >= 1, "site_ranks", value,
                 f"entry {entry!r} must be 'pattern=rank' with a rank >= 1, e.g. '*mlp.down*=64'")
        parsed.append(f"{pattern.strip()}={int(rank)}")
    return tuple(parsed)


@dataclass(kw_only=True)
class RankedFilter(SiteFilter):
    """A :class:`SiteFilter` whose methods code with a rank, one for every site unless ``site_ranks`` says.

    Attributes:
        rank: the rank of every site no ``site_ranks`` entry matches.
        site_ranks: ``"pattern=rank"`` entries (glob patterns on site names, as ``include``); a site takes the
            rank of the first entry that matches it. ``("*mlp.down*=64",)`` doubles the rank of the MLP down
            projection's input over ``rank=32``; :func:`laser.plan` chooses them from measured sensitivity.
    """

    rank: int = 128
    site_ranks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.rank >= 1, "rank", self.rank, "must be >= 1")
        self.site_ranks = _site_ranks(self.site_ranks)

    def rank_for(self, site: str) -> int:
        """The rank ``site`` codes with: its first matching ``site_ranks`` entry, else ``rank``."""
        entries = _rank_entries(self.site_ranks)
        return next((rank for pattern, rank in entries if fnmatch.fnmatchcase(site, pattern)), self.rank)

    @property
    def largest_rank(self) -> int:
        """The largest rank any site may start at (``rank`` or a ``site_ranks`` entry)."""
        return max([self.rank, *(rank for _, rank in _rank_entries(self.site_ranks))])


@functools.cache
def _rank_entries(site_ranks: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """Validated ``site_ranks`` as ``(pattern, rank)`` pairs in order, parsed once per distinct tuple."""
    return tuple((pattern, int(rank)) for pattern, _, rank in (e.rpartition("=") for e in site_ranks))


@dataclass
class NoneConfig(SiteFilter):
    """The baseline: every saved activation is kept as it is; only bytes are counted."""


@dataclass
class LaserConfig(RankedFilter):
    """Settings of the LASER compressor; defaults follow the paper's Table 5.

    Attributes:
        rank: initial rank ``k0`` of every site's basis (also the rank a hard reset returns to); a site matched
            by ``site_ranks`` starts (and resets) at its entry's rank instead.
        site_ranks: per-site ranks, ``"pattern=rank"`` entries (:class:`RankedFilter`).
        threshold: fidelity ``F = ||Z||/||X||`` below which a step counts as low (epsilon).
        growth: rows sampled and orthogonalised into the basis on a low step (``m``).
        max_rank: ceiling on a site's rank; ``None``: 4 times the site's starting rank (512 at the paper's rank
            128), none with ``max_error``.
        patience: consecutive low steps that trigger a hard reset by exact SVD (``p``).
        power_iters: power-iteration steps per training step; the first uses every activation of the step
            (matrix-free), further ones use the step's row sample.
        oversample: columns tracked beyond the coded rank (subspace iteration with Rayleigh-Ritz ordering):
            the power step runs on ``rank + oversample`` columns and codes keep the ``rank`` with the most
            energy, so the coded subspace converges at the rate of the ``(rank + oversample + 1)``-th
            singular value instead of the ``(rank + 1)``-th, for ``oversample / rank`` more projection FLOPs
            and no more stored bytes than the extra basis columns. 0: Algorithm 1.
        memory: weight of the earlier steps' statistics in the power step, a forgetting factor in [0, 1):
            ``Q <- orth(M_t + memory * M_{t-1}' )`` with ``M_{t-1}'`` the previous combined statistic carried
            into the current basis (:func:`laser.subspace.with_memory`), so the basis follows the decayed sum
            of the steps' covariances, about ``1 / (1 - memory)`` steps of them, instead of the last step
            alone. It matters where consecutive training steps see different distributions at one site
            (deep supervision whose steps restart from a fixed state): there each power step fits the last
            one and the next fails the threshold. 0: Algorithm 1.
        max_error: a target instead of a rank: at initialisation and at every reset, each site gets the
            smallest rank (up to ``max_rank``) whose top-k SVD of its sampled rows has a relative
            reconstruction error ``||X - X_k|| / ||X||`` of at most this (``rank`` is then only the rank a site
            starts its first step at); pair it with ``threshold = sqrt(1 - max_error**2)``, the fidelity that
            error means. ``None``: every site starts at ``rank``.
        accumulate_stride: the power-iteration statistic ``M += X^T Z`` uses every this-many-th row of each
            tensor (a strided view from a random offset: no copy). 1 is Algorithm 1 exactly; ``s`` divides
            the cost of that matmul, a third of LASER's extra FLOPs, by ``s``, while ``M`` stays an unbiased
            estimate of ``X^T X Q`` up to a scale the orthonormalisation removes.
        policy: ``"paper"`` follows Algorithm 1; ``"guarded"`` also stores raw any tensor whose own
            fidelity is below ``threshold`` (or not finite), so no reconstruction is worse than the
            threshold. On the CPU that test reads each tensor's fidelity (there is no device to wait for). On
            an accelerator a read would wait for the device once per tensor, so the tests stay on the device
            until :meth:`~laser.Compressor.step` reads them all at once, and the tensor at the same position
            (recursion step) of the next training step is stored raw where the test failed: a position's first
            step under the threshold is stored as codes. Neither policy waits for the device during the forward
            on an accelerator (under ``"paper"`` a non-finite tensor is stored as its codes and the step's
            statistics are dropped).
        matmul_dtype: ``"auto"`` projects, accumulates and reconstructs bf16 activations with bf16 matmuls
            (fp32 accumulation inside each matmul, fp32 fidelity sums, the tracked basis kept in fp32 and
            cast once per step) and everything else in fp32; ``"float32"`` upcasts every activation to
            fp32 first: the reference path, and the one fp16 activations always take (fp16 cannot hold the
            sums ``X^T Z``).
        quantize: ``None`` keeps codes in the activation dtype; ``"int8"`` stores per-column int8 codes.
        reset_rows: rows kept (uniformly sampled) to compute the reset SVD when a reset may be due; ``None``:
            ``max(1024, 2 * rank)``.
        max_resets: a site still under ``threshold`` when a reset is due after this many resets in a row is
            no longer tracked: stored raw from then on (reason ``"untracked"``), so a model on which nothing
            compresses costs what the hooks cost, not an SVD every ``patience`` steps.
        retry_after: steps an untracked site stays raw before it starts again from a fresh initialisation
            (activations early in training are not those of later steps), doubled after each further failure:
            a site that never compresses is retried about ``log2(steps / retry_after)`` times in a run, each
            costing at most ``patience * (max_resets + 1)`` steps of tracking. ``None``: never retried.
        seed: seed of the compressor's own generator (row sampling, random completions).
        sync: in a distributed run, all-reduce the statistics so every rank holds the same bases.
        factored: a linear layer's coded input gives its weight gradient as ``(dY^T Z) Q^T`` (DESIGN hard
            part 13): no reconstruction, and fewer FLOPs than the baseline's ``dY^T X`` where ``k`` is under
            both widths; the same gradient as reconstruct-then-matmul up to rounding. ``False``: every coded
            tensor is reconstructed (the reference this path is tested against).
        bases: ``"site"`` (Algorithm 1): one basis per site, shared by every recursion step. ``"position"``: one
            per site and position, the n-th storage a site saves in a forward (its n-th recursion step) coded
            against the n-th basis, each tracked across training steps as a site's is and each paying its own
            basis and accumulator. Positions restart with every ``with comp:`` (a :func:`laser.checkpoint`
            region's rerun counts its own). It pays where a forward has few recursion steps over many rows: on
            the converged quick preset (2 positions, 1568 rows) it is within 0.0015 of the per-tensor oracle's
            gradient cosine at the same bytes, where one shared basis lags by about 0.005
            (``results/parity-quick.md``). At depth it does not: 24 positions of 242 rows (the paper's depth,
            batch 2) never beat break-even, so everything stays raw (``python benchmarks/compressor.py --model
            lowrank``). Hence ``"site"``, the paper's premise, is the default.
    """

    threshold: float = 0.95
    growth: int = 4
    max_rank: int | None = None
    patience: int = 2
    power_iters: int = 1
    oversample: int = 0
    memory: float = 0.0
    max_error: float | None = None
    accumulate_stride: int = 1
    policy: str = "guarded"
    matmul_dtype: str = "auto"
    quantize: str | None = None
    reset_rows: int | None = None
    max_resets: int = 3
    retry_after: int | None = None
    seed: int = 0
    sync: bool = True
    factored: bool = True
    bases: str = "site"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.bases in ("site", "position"), "bases", self.bases, "use 'site' or 'position'")
        _require(0.0 < self.threshold <= 1.0, "threshold", self.threshold, "must be in (0, 1]")
        _require(self.growth >= 1, "growth", self.growth, "must be >= 1")
        _require(self.max_rank is None or self.max_rank >= self.largest_rank, "max_rank", self.max_rank,
                 f"must be >= the largest starting rank ({self.largest_rank}, rank or site_ranks); raise max_rank or "
                 "lower the rank, or leave max_rank unset (4 times each site's rank)")
        _require(self.patience >= 1, "patience", self.patience, "must be >= 1")
        _require(self.power_iters >= 1, "power_iters", self.power_iters, "must be >= 1")
        _require(self.oversample >= 0, "oversample", self.oversample, "must be >= 0 (0: Algorithm 1)")
        _require(0.0 <= self.memory < 1.0, "memory", self.memory,
                 "must be in [0, 1) (a forgetting factor; 0: Algorithm 1)")
        _require(self.max_error is None or 0.0 < self.max_error < 1.0, "max_error", self.max_error,
                 "must be in (0, 1) (a relative reconstruction error) or None")
        _require(self.accumulate_stride >= 1, "accumulate_stride", self.accumulate_stride,
                 "must be >= 1 (1: every row)")
        _require(self.policy in ("paper", "guarded"), "policy", self.policy, "use 'paper' or 'guarded'")
        _require(self.matmul_dtype in ("auto", "float32"), "matmul_dtype", self.matmul_dtype,
                 "use 'auto' (bf16 matmuls for bf16 activations) or 'float32' (the reference path)")
        _require(self.quantize in (None, "int8"), "quantize", self.quantize, "use None or 'int8'")
        _require(self.reset_rows is None or self.reset_rows >= self.largest_rank, "reset_rows", self.reset_rows,
                 f"must be >= the largest starting rank ({self.largest_rank}, rank or site_ranks); raise reset_rows "
                 "or lower the rank, or leave reset_rows unset (max(1024, 2 * that rank))")
        _require(self.max_resets >= 0, "max_resets", self.max_resets, "must be >= 0")
        _require(self.retry_after is None or self.retry_after >= 1, "retry_after", self.retry_after,
                 "must be >= 1 (steps before an untracked site is retried) or None (never retried)")

    def rank_ceiling(self, site: str) -> int:
        """``max_rank``, or when unset the default it derives from the site's starting rank (none with
        ``max_error``: the error target decides each site's rank)."""
        if self.max_rank is not None:
            return self.max_rank
        return 4 * self.rank_for(site) if self.max_error is None else 2**31

    @property
    def sample_size(self) -> int:
        """``reset_rows``, or the default it derives from the largest starting rank when unset."""
        return self.reset_rows if self.reset_rows is not None else max(1024, 2 * self.largest_rank)


@dataclass
class QuantConfig(SiteFilter):
    """ActNN-style per-group quantization of every saved activation.

    Attributes:
        bits: 8, 4 or 2 bits per value (4 and 2 are bit-packed).
        group_size: values sharing one min and one scale.
        stochastic: unbiased stochastic rounding instead of round-to-nearest.
        seed: seed of the rounding noise.
    """

    bits: int = 8
    group_size: int = 256
    stochastic: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.bits in (2, 4, 8), "bits", self.bits, "use 2, 4 or 8")
        _require(self.group_size >= 1, "group_size", self.group_size, "must be >= 1")


@dataclass
class ProjectionConfig(RankedFilter):
    """Fixed-rank projections that do not track the subspace (``static``, ``sketch``, ``oracle``).

    Attributes:
        rank: columns of every site's basis; ``site_ranks``: per-site ranks (:class:`RankedFilter`).
        quantize: ``None`` or ``"int8"`` codes, as in :class:`LaserConfig`.
        seed: seed of the random projections (``sketch``) and randomized SVDs (``oracle``).
    """

    quantize: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.quantize in (None, "int8"), "quantize", self.quantize, "use None or 'int8'")


def field_names(config_type: type) -> list[str]:
    """Names of the settings a config dataclass accepts (for error messages and CLI parsing)."""
    return [f.name for f in fields(config_type)]
