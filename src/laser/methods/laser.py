"""LASER: saved activations as low-rank codes against a per-site basis tracked across training steps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from laser import subspace
from laser.config import LaserConfig
from laser.hooks import ActivationMethod, Packed, Reason, SiteAccount, tensor_bytes
from laser.methods.projection import (
    CosineSums,
    add_stored,
    cosine_of,
    make_codes,
    never_pays,
    pays,
    read_sums,
    squared_norm,
)
from laser.report import SiteReport


@dataclass
class SiteState:
    """What LASER keeps of one site across steps (saved by :meth:`Compressor.state_dict`).

    Attributes:
        dim: width D of the site.
        basis: (D, k + p) fp32 orthonormal basis, columns ordered by energy (``p``: ``oversample``, where
            D allows); ``None`` during the site's first step, whose activations are sampled to initialise it
            by a top-k SVD (each coded meanwhile against its own basis).
        rank: the rank ``k`` codes are made with: the leading ``k`` columns of ``basis``.
        low_steps: consecutive steps with fidelity under the threshold (``c`` in Algorithm 1).
        expansions / resets: cumulative counts (an expansion that added no column is not counted).
        resets_in_a_row: resets since the site last reached its threshold.
        frozen: the rank passed break-even for any batch size: stored raw, no longer tracked.
        untracked: still under the threshold when a reset was due after ``max_resets`` resets in a row:
            stored raw, not tracked until ``retry_at``.
        retries: times the site was taken up again after it stopped being tracked (``LaserConfig.retry_after``).
        retry_at: the training step (:attr:`Compressor.steps` numbering) an untracked site starts again from a
            fresh initialisation; ``None``: never.
        fidelity: the last step's tracking fidelity ``||Z||/||X||`` over all of its coded tensors.
        nonfinite_steps: steps whose statistics were dropped because an activation was not finite.
        weak: positions (the order of a step's tracked tensors at the site: its recursion steps) whose own
            fidelity was under the threshold, or not finite, in the last step that checked them without
            reading the device (the guarded policy on an accelerator); those positions are stored raw.
        memory: with ``LaserConfig.memory``, the earlier steps' statistic in the coordinates of ``basis``
            ((k + p, k + p) fp32, :func:`laser.subspace.memory_in`); ``None`` before the site's first update.
    """

    dim: int
    basis: torch.Tensor | None = None
    rank: int = 0
    low_steps: int = 0
    expansions: int = 0
    resets: int = 0
    resets_in_a_row: int = 0
    frozen: bool = False
    untracked: bool = False
    retries: int = 0
    retry_at: int | None = None
    fidelity: float = 1.0
    nonfinite_steps: int = 0
    weak: tuple[int, ...] = ()
    memory: torch.Tensor | None = None


@dataclass
class StepStats:
    """What one site gathers during the current step; dropped after :meth:`Compressor.step`.

    Attributes:
        encoded: tensors stored as codes; the first of the step is charged the whole basis at break-even.
        held_rows: rows of the tensors held raw (pending) until the step pays for the basis.
        rank: rank of the basis this step's codes were made with.
        casts: the basis cast to a matmul dtype (made once, shared by the step's records).
        accumulator: ``M = sum X^T Z`` (D, k) fp32, for the power step.
        tracked: fidelity sums of every tensor coded for tracking (the guard's refusals too).
        stored: fidelity sums of what backward gets back (after int8 rounding).
        sample, sample_keys: the step's uniform row sample (expansion and reset rows).
        checks: the guarded policy's per-tensor test left on the device (``||Z||^2 < threshold^2 ||X||^2``,
            or not finite), one 0-d bool per tracked tensor in order, read once in :meth:`Compressor.update`.
    """

    encoded: int = 0
    held_rows: int = 0
    rank: int = 0
    casts: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    accumulator: torch.Tensor | None = None
    tracked: CosineSums = field(default_factory=CosineSums)
    stored: CosineSums = field(default_factory=CosineSums)
    sample: torch.Tensor | None = None
    sample_keys: torch.Tensor | None = None
    checks: list[torch.Tensor] = field(default_factory=list)

    def nbytes(self) -> int:
        """LASER's own bytes for the site during the step: accumulator, row sample and keys, and the fp32
        master basis where the codes were made with a cast copy (the copy is counted with the codes)."""
        tensors = (self.accumulator, self.sample, self.sample_keys)
        master = sum(4 * cast.numel() for cast in self.casts.values())
        return master + sum(tensor_bytes(t) for t in tensors if t is not None)


def site_share(compute: torch.dtype) -> float:
    """What a site's first coded tensor of a step is charged at break-even, in bases of ``compute`` dtype:
    the basis its codes use, the fp32 ``X^T Z`` accumulator of its size, and the fp32 master basis where the
    codes use a cast copy. Later tensors of the step pay only their codes, so a site never stores more than
    raw (the few sampled rows aside)."""
    extra = 4 + (0 if compute == torch.float32 else 4)
    return 1.0 + extra / compute.itemsize


def matmul_dtype(dtype: torch.dtype, setting: str) -> torch.dtype:
    """The dtype LASER projects and reconstructs an activation of ``dtype`` in (``LaserConfig.matmul_dtype``)."""
    return dtype if dtype == torch.bfloat16 and setting == "auto" else torch.float32


class Compressor(ActivationMethod):
    """Stores every admitted saved activation as codes ``Z = X Q`` against its site's basis ``Q``.

    One basis per site (one activation stream: module path, op and width) is shared by all recursion steps
    and tracked across training steps: during the forward each site accumulates ``M += X^T Z`` and the
    fidelity sums; :meth:`step` then does one power-iteration step ``Q <- orth(M)`` when the step's
    fidelity ``||Z||/||X||`` reached ``threshold``, otherwise expands the basis by ``growth`` orthogonalised
    sampled rows, and after ``patience`` low steps resets it to the top-``rank`` SVD of sampled rows
    (Algorithm 1). A site that is still low when a reset is due after ``max_resets`` resets in a row stops
    being tracked, and is taken up again from a fresh initialisation after ``retry_after`` steps, twice as
    many after each further failure. Storages whose codes would not beat break-even on the current step are
    stored raw; every raw storage is reported with its reason.

    In steady state the forward never waits for the device under the ``"paper"`` policy: statistics stay on
    the device until :meth:`step`, and bf16 activations are projected with bf16 matmuls against a bf16 copy
    of the basis (``LaserConfig.matmul_dtype``).

    >>> comp = Compressor(model, LaserConfig(rank=128))    # doctest: +SKIP
    >>> for x, y in loader:
    ...     with comp:
    ...         loss = loss_fn(model(x), y)
    ...     loss.backward()
    ...     comp.step()
    ...     opt.step(); opt.zero_grad()
    >>> print(comp.report())
    """

    name = "laser"

    def __init__(self, model: nn.Module, config: LaserConfig | None = None) -> None:
        config = config if config is not None else LaserConfig()
        if not isinstance(config, LaserConfig):
            raise TypeError(f"config must be a LaserConfig, got {type(config).__name__}")
        super().__init__(model, config)
        self.sites: dict[str, SiteState] = {}
        self.stats: dict[str, StepStats] = {}
        # Draws of the basis updates (random completions, randomized SVDs) come from their own generator:
        # every data-parallel rank makes the same updates in the same order, whatever its own data drew.
        self.update_generator = torch.Generator().manual_seed(config.seed + 1)
        # None: the guarded policy's per-tensor test is left on the device for accelerator tensors only (a
        # read there waits for the device); True / False force it either way (the tests use True on a CPU).
        self.defer_guard: bool | None = None

    def __enter__(self) -> Compressor:
        if not self.active_in_thread():
            self._thread.positions = {}  # bases="position": the last position each site has had in this forward
        return super().__enter__()

    @property
    def factored_linears(self) -> bool:
        return self.config.factored

    # ------------------------------------------------------------------ forward
    def encode(self, x: torch.Tensor, site: str) -> Packed | str:
        cfg = self.config
        if cfg.bases == "position":
            site = self._position_site(site)
        state = self.sites.get(site)
        if state is None:
            state = self.sites[site] = SiteState(x.shape[1])
        if state.frozen:
            return Reason.FROZEN
        if state.untracked:
            return Reason.UNTRACKED
        stats = self.stats.get(site)
        if stats is None:
            stats = self.stats[site] = StepStats()
        if state.basis is None:
            return self._encode_first_step(stats, state, x, site)
        rank = state.rank
        if never_pays(state.dim, rank, cfg.quantize, x.dtype):
            state.frozen = True
            return Reason.FROZEN
        compute = matmul_dtype(x.dtype, cfg.matmul_dtype)
        if stats.encoded == 0 and not self._step_pays(stats, x, rank, compute):
            # a position is one storage of the forward: no later one can join it to pay for the basis
            return Reason.BREAK_EVEN if cfg.bases == "position" else Reason.PENDING
        tracked = self._basis_in(state, stats, compute)  # (D, k + p)
        xc = x.to(tracked.dtype)  # (N, D); no copy unless the reference path upcasts a 16-bit activation
        projected = xc @ tracked  # (N, k + p): all of it feeds the power step, the leading k are stored
        codes = projected[:, :rank] if projected.shape[1] > rank else projected  # (N, k)
        x_sq, codes_sq = squared_norm(xc), squared_norm(codes)
        stats.rank = rank
        self._accumulate(state, stats, xc, projected)
        stats.tracked.add(codes_sq, x_sq, codes_sq)
        if not self._guard_passes(state, stats, codes_sq, x_sq):
            return Reason.GUARD
        return self._store(stats, codes, tracked[:, :rank], x, x_sq, codes_sq, shared=tracked)

    def _step_pays(self, stats: StepStats, x: torch.Tensor, rank: int, compute: torch.dtype) -> bool:
        """Break-even on the current step: the site's first coded tensor of a step is charged its basis, the
        accumulator and the fp32 master (:func:`site_share`), so it waits, held raw, until the tensors the site
        held raw so far in this step plus ``x`` would beat that together; then they are all coded. A step
        whose tensors never get there stores them raw: a site never stores more than raw."""
        cfg = self.config
        stats.held_rows += x.shape[0]
        return pays(stats.held_rows, x.shape[1], rank, cfg.quantize, x.dtype, site_share(compute), compute)

    def _encode_first_step(self, stats: StepStats, state: SiteState, x: torch.Tensor, site: str) -> Packed | str:
        """A site's first step: each tensor gets codes against its own top-k basis, rows are sampled for Q_0.

        Storing the first step raw would make it the step of peak memory, as high as without compression;
        a per-tensor basis (the oracle, charged to that tensor) compresses it at once. The shared basis
        ``Q_0`` is the top-k SVD of the rows sampled over the whole step (Algorithm 1, line 1).
        """
        cfg = self.config
        xf = x.float()  # (N, D); no copy for fp32 activations
        x_sq = squared_norm(xf)
        if not torch.isfinite(x_sq):
            return Reason.NONFINITE  # never feed NaN/Inf into a basis
        rank = min(cfg.rank_for(self._site_of(site)), state.dim)
        if never_pays(state.dim, rank, cfg.quantize, x.dtype):
            state.frozen = True
            return Reason.FROZEN
        self._sample(state, stats, xf)
        if not pays(*x.shape, rank, cfg.quantize, x.dtype):
            return Reason.BREAK_EVEN
        basis = subspace.top_k_basis(xf, rank, self.generator)  # (D, k), this tensor's own
        codes = xf @ basis
        codes_sq = squared_norm(codes)
        stats.rank = rank
        stats.tracked.add(codes_sq, x_sq, codes_sq)
        if not self._guard_passes(state, stats, codes_sq, x_sq):
            return Reason.GUARD
        return self._store(stats, codes, basis, x, x_sq, codes_sq)

    def _store(self, stats: StepStats, codes: torch.Tensor, basis: torch.Tensor, x: torch.Tensor,
               x_sq: torch.Tensor, codes_sq: torch.Tensor, shared: torch.Tensor | None = None) -> Packed:
        """Make the record of ``codes`` against ``basis``; ``shared`` is the whole basis it is part of (the
        tracked columns beyond the coded rank), counted once per step with the site's records."""
        record = make_codes(codes, basis, x.dtype, self.config.quantize)
        if shared is not None:
            record.shared = (shared,)
        add_stored(stats.stored, x_sq, codes_sq, codes, record)
        stats.encoded += 1
        return record

    @staticmethod
    def _basis_in(state: SiteState, stats: StepStats, dtype: torch.dtype) -> torch.Tensor:
        """The basis in ``dtype``: itself for fp32, else a copy made once per step."""
        if dtype == state.basis.dtype:
            return state.basis
        if dtype not in stats.casts:
            stats.casts[dtype] = state.basis.to(dtype)
        return stats.casts[dtype]

    def _guard_passes(self, state: SiteState, stats: StepStats, codes_sq: torch.Tensor, x_sq: torch.Tensor) -> bool:
        """Whether a tensor may be stored as codes: always under ``"paper"``; under ``"guarded"`` when its
        fidelity reaches the threshold, tested as ``||Z||^2 >= threshold^2 ||X||^2`` (which NaN fails).

        On the CPU the test reads the tensor's own fidelity (nothing to wait for). On an accelerator that read
        would wait for the device once per tensor, so the test stays there, read for all sites at once in
        :meth:`update`, and the tensor at the same position of the next step is stored raw where this one
        failed (:attr:`SiteState.weak`): a position's first step under the threshold is stored as codes.
        """
        cfg = self.config
        if cfg.policy != "guarded":
            return True
        if not self._defers_guard(codes_sq):
            return bool(codes_sq >= cfg.threshold**2 * x_sq)
        position = len(stats.checks)
        stats.checks.append(~(codes_sq >= cfg.threshold**2 * x_sq))  # stays on the device
        return position not in state.weak

    def _defers_guard(self, value: torch.Tensor) -> bool:
        """Whether the guard's test of ``value`` is left on the device (:meth:`_guard_passes`)."""
        return value.device.type != "cpu" if self.defer_guard is None else self.defer_guard

    def _accumulate(self, state: SiteState, stats: StepStats, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Add one tensor to the step's statistics: ``M += X^T Z`` (fp32, Z over every tracked column) and the
        row sample."""
        cfg = self.config
        rows, row_codes = x, codes
        if cfg.accumulate_stride > 1 and len(x) > cfg.accumulate_stride:
            # A random offset per tensor, so a row layout with a period dividing the stride (tokens of a
            # sequence) is still covered across the step's tensors.
            start = int(torch.randint(cfg.accumulate_stride, (), generator=self.generator))
            rows, row_codes = x[start :: cfg.accumulate_stride], codes[start :: cfg.accumulate_stride]
        if stats.accumulator is None:
            stats.accumulator = (rows.T @ row_codes).float()  # (D, k)
        elif rows.dtype == torch.float32:
            stats.accumulator.addmm_(rows.T, row_codes)
        else:  # bf16 product (fp32 inside the matmul), summed across tensors in fp32
            stats.accumulator.add_(rows.T @ row_codes)
        self._sample(state, stats, x)

    def _sample_capacity(self, state: SiteState) -> int:
        """Rows a site samples this step: enough for a reset SVD at initialisation, when a reset may be due,
        or for further power steps; else the ``growth`` rows an expansion takes. A function of the site's
        synchronised state, so every data-parallel rank keeps the same number."""
        cfg = self.config
        if state.basis is None or state.low_steps >= cfg.patience - 1 or cfg.power_iters > 1:
            return cfg.sample_size
        return cfg.growth

    def _sample(self, state: SiteState, stats: StepStats, x: torch.Tensor) -> None:
        stats.sample, stats.sample_keys = subspace.sample_rows(
            x, self._sample_capacity(state), self.generator, stats.sample, stats.sample_keys
        )

    # ------------------------------------------------------------- between steps
    def update(self) -> None:
        """Algorithm 1 for every site of the step, with one read of the device for all sites' fidelity sums
        and the power steps of sites of one shape batched (one QR and one eigensolve call)."""
        cfg = self.config
        if cfg.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._synchronize()
        live = [(site, state, self.stats[site]) for site, state in self.sites.items()
                if site in self.stats and not state.frozen and not state.untracked]
        self._retry_due()
        self._read_checks([(state, stats) for _, state, stats in live])
        measured = [stats for _, state, stats in live if state.basis is not None and stats.accumulator is not None]
        sums = dict(zip(map(id, measured), read_sums([stats.tracked for stats in measured]), strict=True))
        remembered = [(state, stats, state.basis) for _, state, stats in live
                      if cfg.memory and state.basis is not None and stats.accumulator is not None]
        for state, stats, basis in remembered:
            stats.accumulator = subspace.with_memory(stats.accumulator, basis, state.memory, cfg.memory)
        powers = [(state, stats) for site, state, stats in live
                  if self._update_site(site, state, stats, sums.get(id(stats)))]
        for (state, stats), basis in zip(powers, subspace.power_steps([s.accumulator for _, s in powers]),
                                         strict=True):
            for _ in range(cfg.power_iters - 1):
                basis = subspace.power_step(stats.sample.T @ (stats.sample @ basis))
            state.basis, state.low_steps, state.resets_in_a_row = basis, 0, 0
        for state, stats, old in remembered:  # whatever changed the basis (power step, expansion, reset)
            if not state.untracked:
                state.memory = subspace.memory_in(state.basis, stats.accumulator, old)

    @staticmethod
    def _read_checks(sites: list[tuple[SiteState, StepStats]]) -> None:
        """The step's deferred guard tests, every site's at once (one read): the positions each site stores
        raw next step."""
        checked = [(state, stats.checks) for state, stats in sites if stats.checks]
        if not checked:
            return
        device = checked[0][1][0].device
        failed = torch.stack([c.to(device) for _, checks in checked for c in checks]).tolist()
        start = 0
        for state, checks in checked:
            state.weak = tuple(i for i, bad in enumerate(failed[start : start + len(checks)]) if bad)
            start += len(checks)

    def clear_step(self) -> None:
        self.stats = {}

    def _position_site(self, site: str) -> str:
        """The key of a storage's basis under ``bases="position"``: ``site@n`` for the site's n-th storage of this
        forward (its n-th recursion step). Each storage is encoded once: a position never holds one pending."""
        positions = self._thread.positions
        count = positions[site] = positions.get(site, -1) + 1
        return f"{site}@{count}"

    def _site_of(self, key: str) -> str:
        """The site a basis key belongs to (``site@n`` under ``bases="position"``): what ``site_ranks``,
        ``max_rank`` and the report match."""
        return key.rpartition("@")[0] if self.config.bases == "position" else key

    def _update_site(self, site: str, state: SiteState, stats: StepStats,
                     sums: tuple[float, float, float] | None) -> bool:
        """Algorithm 1 for one site: initialise, or expand / reset by the step's fidelity (``sums``: its tracked
        ``(dot, x_sq, y_sq)``); True when a power step is due instead (:meth:`update` batches them)."""
        cfg = self.config
        if state.basis is None:
            if stats.sample is not None:
                self._reset(site, state, stats)
            return False
        if sums is None:
            return False
        if not all(map(math.isfinite, sums)):
            state.nonfinite_steps += 1  # NaN/Inf reached the statistics: keep the basis as it is
            return False
        state.fidelity = cosine_of(*sums)
        if state.fidelity >= cfg.threshold:
            return True
        state.low_steps += 1
        if state.low_steps < cfg.patience:
            rows = subspace.top_rows(stats.sample, stats.sample_keys, cfg.growth)
            ceiling = cfg.rank_ceiling(self._site_of(site))
            grown = subspace.expand(state.basis, rows, ceiling + cfg.oversample)
            added = grown.shape[1] - state.basis.shape[1]
            state.expansions += added > 0
            state.basis, state.rank = grown, min(state.rank + added, ceiling, grown.shape[1])
        elif state.resets_in_a_row >= cfg.max_resets:
            self._stop_tracking(state)
        else:
            self._reset(site, state, stats)
            state.low_steps = 0
            state.resets += 1
            state.resets_in_a_row += 1
        return False

    def _stop_tracking(self, state: SiteState) -> None:
        """Store the site raw from the next step on, until its retry is due: ``retry_after * 2**retries`` steps
        on (exponential back-off, so a site that never compresses costs ``log2`` of the run's steps in
        retries), or never."""
        state.untracked = True
        after = self.config.retry_after
        state.retry_at = None if after is None else self.steps + 1 + after * 2**state.retries

    def _retry_due(self) -> None:
        """Untracked sites whose retry is due at the next step start again as new sites (their first step
        codes each tensor against its own basis and samples rows for a fresh one, Algorithm 1 line 1). A
        function of the synchronised state and the step count: every data-parallel rank retries alike."""
        for state in self.sites.values():
            if state.untracked and state.retry_at is not None and state.retry_at <= self.steps + 1:
                state.untracked, state.retry_at, state.retries = False, None, state.retries + 1
                state.basis, state.memory, state.weak = None, None, ()
                state.low_steps = state.resets_in_a_row = 0

    def _reset(self, site: str, state: SiteState, stats: StepStats) -> None:
        """The basis from the top singular vectors of the step's sampled rows: ``rank`` coded columns (or, with
        ``max_error``, as many as the sample needs for that error) and up to ``oversample`` more tracked
        (Algorithm 1 lines 1 and 19)."""
        cfg = self.config
        site = self._site_of(site)
        state.rank = min(cfg.rank_for(site), state.dim)
        if cfg.max_error is not None:
            state.rank = min(subspace.rank_for_error(stats.sample, cfg.max_error), cfg.rank_ceiling(site), state.dim)
        state.basis = subspace.top_k_basis(stats.sample, min(state.rank + cfg.oversample, state.dim),
                                           self.update_generator)

    def _synchronize(self) -> None:
        """Make every rank see the statistics of all ranks, so all make the same basis update.

        Ranks first agree on the set of sites (a rank may have seen a site another has not: a smaller last
        batch, a data-dependent branch) and on which are no longer tracked, so every collective below is
        called by all ranks alike. Accumulators and fidelity sums are then all-reduced; row samples are
        all-gathered and the rows with the largest keys kept, which is again a uniform sample of the union.
        Sites are visited in name order; a rank that saw nothing at a site contributes zeros.
        """
        self._agree_on_sites()
        for name in sorted(self.sites):
            state = self.sites[name]
            if state.frozen or state.untracked:
                continue
            stats = self.stats.get(name) or StepStats()
            if state.basis is None:
                device = stats.sample.device if stats.sample is not None else torch.device("cpu")
                stats.sample, stats.sample_keys = self._gather_sample(state, stats, state.dim, device)
                self.stats[name] = stats
                continue
            d, k = state.basis.shape
            device = state.basis.device
            sums = stats.tracked
            values = torch.zeros(d * k + 2, device=device)
            if stats.accumulator is not None:
                values = torch.cat([stats.accumulator.flatten(), sums.x_sq.view(1), sums.y_sq.view(1)])
            dist.all_reduce(values)
            if values[-2] == 0:
                self.stats.pop(name, None)
                continue
            stats.accumulator = values[:-2].view(d, k)
            stats.tracked = CosineSums()
            stats.tracked.add(values[-1], values[-2], values[-1])
            stats.sample, stats.sample_keys = self._gather_sample(state, stats, d, device)
            self.stats[name] = stats

    def _agree_on_sites(self) -> None:
        """Every rank learns every site any rank has, and a site no longer tracked anywhere stops everywhere (a
        rank that had not seen it takes up the furthest rank's retry count and step)."""
        mine = {name: (s.dim, s.frozen, (s.retries, s.untracked), s.retry_at) for name, s in self.sites.items()}
        everyone: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(everyone, mine)
        for theirs in everyone:
            for name, (dim, frozen, (retries, untracked), retry_at) in theirs.items():
                state = self.sites.get(name)
                if state is None:
                    state = self.sites[name] = SiteState(dim)
                state.frozen |= frozen
                if (retries, untracked) > (state.retries, state.untracked):
                    state.retries, state.untracked, state.retry_at = retries, untracked, retry_at

    def _gather_sample(self, state: SiteState, stats: StepStats, dim: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = self.config.sample_size
        rows = torch.zeros(capacity, dim, device=device)
        # -1: an empty slot, never selected over a real row
        keys = torch.full((capacity,), -1.0, dtype=torch.float64, device=device)
        if stats.sample is not None:
            rows[: len(stats.sample)] = stats.sample
            keys[: len(stats.sample)] = stats.sample_keys.to(device)
        world = dist.get_world_size()
        all_rows = [torch.empty_like(rows) for _ in range(world)]
        all_keys = [torch.empty_like(keys) for _ in range(world)]
        dist.all_gather(all_rows, rows)
        dist.all_gather(all_keys, keys)
        rows, keys = torch.cat(all_rows), torch.cat(all_keys).cpu()
        top = torch.topk(keys, min(self._sample_capacity(state), int((keys >= 0).sum()))).indices
        return rows[top.to(device)], keys[top]

    # ------------------------------------------------------------------ report
    def site_row(self, site: str, account: SiteAccount) -> SiteReport:
        if self.config.bases == "position":  # the site's positions make its one row
            keys = [key for key in self.stats if self._site_of(key) == site]
        else:
            keys = [site] if site in self.stats else []
        if not keys:
            return super().site_row(site, account)
        states, steps = [self.sites[key] for key in keys], [self.stats[key] for key in keys]
        stored = CosineSums()
        for stats in steps:
            if stats.stored.x_sq is not None:
                stored.add(stats.stored.dot, stats.stored.x_sq, stats.stored.y_sq)
        state_bytes = sum(stats.nbytes() for stats in steps)
        state_bytes += sum(tensor_bytes(state.memory) for state in states if state.memory is not None)
        rank = max(stats.rank for stats in steps)
        return SiteReport(site, account.dim, rank or account.dim, stored.cosine(), account.raw_bytes,
                          account.stored_bytes + state_bytes, account.tensors,
                          sum(state.expansions for state in states), sum(state.resets for state in states),
                          account.fallbacks, dict(account.reasons), state_bytes, account.factored)

    def extra_state(self) -> dict:
        return {"sites": {site: dict(vars(s)) for site, s in self.sites.items()},
                "update_generator": self.update_generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self.sites = {site: SiteState(**fields) for site, fields in state["sites"].items()}
        self.update_generator.set_state(state["update_generator"])
