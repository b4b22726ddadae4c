"""LASER: saved activations as low-rank codes against a per-site basis tracked across training steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from laser import subspace
from laser.config import LaserConfig
from laser.hooks import ActivationMethod, Packed, SiteAccount
from laser.methods.projection import make_codes, never_pays, pays, squared_norm
from laser.report import SiteReport


@dataclass
class SiteState:
    """Tracking state of one site: its basis, counters and the statistics of the current step.

    Attributes:
        dim: width D of the site.
        basis: (D, k) fp32 orthonormal basis; ``None`` during the site's first step, whose activations
            are sampled to initialise it by a top-k SVD (each coded meanwhile against its own basis).
        low_steps: consecutive steps with fidelity under the threshold (``c`` in Algorithm 1).
        expansions / resets: cumulative counts.
        frozen: the rank passed break-even for any batch size: stored raw, no longer tracked.
        fidelity: the last step's fidelity ``||Z||/||X||`` over all of its tensors.
        rank_used: rank of the basis the current step's codes were made with.
        tensors_last_step: admitted tensors the site saw in the last step; each is charged that share of
            the basis when deciding break-even (one basis serves them all).
        nonfinite_steps: steps whose statistics were dropped because an activation was not finite.
        casts: the basis cast to a matmul dtype for the current step (built once, shared by its records).
    """

    dim: int
    basis: torch.Tensor | None = None
    low_steps: int = 0
    expansions: int = 0
    resets: int = 0
    frozen: bool = False
    fidelity: float = 1.0
    rank_used: int = 0
    tensors_last_step: int = 1
    nonfinite_steps: int = 0
    tensors: int = 0
    casts: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    accumulator: torch.Tensor | None = None
    codes_sq: torch.Tensor | None = None
    x_sq: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    sample_keys: torch.Tensor | None = None

    def clear_step(self) -> None:
        """Forget the current step's statistics."""
        self.accumulator = self.codes_sq = self.x_sq = self.sample = self.sample_keys = None
        self.casts = {}
        if self.tensors:
            self.tensors_last_step, self.tensors = self.tensors, 0

    def basis_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The basis in ``dtype``: itself for fp32, else a copy made once per step."""
        if dtype == self.basis.dtype:
            return self.basis
        if dtype not in self.casts:
            self.casts[dtype] = self.basis.to(dtype)
        return self.casts[dtype]


def matmul_dtype(dtype: torch.dtype, setting: str) -> torch.dtype:
    """The dtype LASER projects and reconstructs an activation of ``dtype`` in (``LaserConfig.matmul_dtype``)."""
    return dtype if dtype == torch.bfloat16 and setting == "auto" else torch.float32


PERSISTED = ("dim", "basis", "low_steps", "expansions", "resets", "frozen", "fidelity", "rank_used",
             "tensors_last_step", "nonfinite_steps")


class Compressor(ActivationMethod):
    """Stores every admitted saved activation as codes ``Z = X Q`` against its site's basis ``Q``.

    One basis per site (module path + width) is shared by all recursion steps and tracked across training
    steps: during the forward each site accumulates ``M += X^T Z`` and the fidelity sums; :meth:`step`
    then does one power-iteration step ``Q <- orth(M)`` when the step's fidelity ``||Z||/||X||`` reached
    ``threshold``, otherwise expands the basis by ``growth`` orthogonalised sampled rows, and after
    ``patience`` low steps resets it to the top-``rank`` SVD of sampled rows (Algorithm 1). Sites whose
    codes would not beat break-even are stored raw and reported as fallbacks.

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

    # ------------------------------------------------------------------ forward
    def encode(self, x: torch.Tensor, site: str) -> Packed | None:
        cfg = self.config
        state = self.sites.get(site)
        if state is None:
            state = self.sites[site] = SiteState(x.shape[1])
        if state.frozen:
            return None
        state.tensors += 1
        if state.basis is None:
            return self._encode_first_step(state, x)
        rank = state.basis.shape[1]
        if never_pays(state.dim, rank, cfg.quantize, x.dtype):
            state.frozen = True
            return None
        compute = matmul_dtype(x.dtype, cfg.matmul_dtype)
        if not pays(x, rank, cfg.quantize, x.dtype, 1.0 / state.tensors_last_step, compute):
            return None
        basis = state.basis_in(compute)  # (D, k)
        xc = x.to(basis.dtype)  # (N, D); no copy unless the reference path upcasts a 16-bit activation
        codes = xc @ basis  # (N, k)
        x_sq, codes_sq = squared_norm(xc), squared_norm(codes)
        self._accumulate(state, xc, codes, x_sq, codes_sq)
        if not self._guard_passes(codes_sq, x_sq):  # the only read of a device value during the forward
            return None
        return make_codes(codes, basis, x.dtype, cfg.quantize)

    def _encode_first_step(self, state: SiteState, x: torch.Tensor) -> Packed | None:
        """A site's first step: each tensor gets codes against its own top-k basis, rows are sampled for Q_0.

        Storing the first step raw would make it the step of peak memory, as high as without compression;
        a per-tensor basis (the oracle, charged to that tensor) compresses it at once. The shared basis
        ``Q_0`` is the top-k SVD of the rows sampled over the whole step (Algorithm 1, line 1).
        """
        cfg = self.config
        xf = x.float()  # (N, D); no copy for fp32 activations
        x_sq = squared_norm(xf)
        if not torch.isfinite(x_sq):
            return None  # never feed NaN/Inf into a basis
        state.sample, state.sample_keys = subspace.sample_rows(
            xf, cfg.reset_rows, self.generator, state.sample, state.sample_keys
        )
        rank = min(cfg.rank, state.dim)
        if never_pays(state.dim, rank, cfg.quantize, x.dtype):
            state.frozen = True
            return None
        if not pays(x, rank, cfg.quantize, x.dtype):
            return None
        basis = subspace.top_k_basis(xf, rank, self.generator)  # (D, k), this tensor's own
        codes = xf @ basis
        state.rank_used = rank
        if not self._guard_passes(squared_norm(codes), x_sq):
            return None
        return make_codes(codes, basis, x.dtype, cfg.quantize)

    def _guard_passes(self, codes_sq: torch.Tensor, x_sq: torch.Tensor) -> bool:
        """Whether a tensor may be stored as codes: always under ``"paper"``; under ``"guarded"`` when its
        fidelity reaches the threshold, tested as ``||Z||^2 >= threshold^2 ||X||^2`` (which NaN fails)."""
        cfg = self.config
        return cfg.policy != "guarded" or bool(codes_sq >= cfg.threshold**2 * x_sq)

    def _accumulate(self, state: SiteState, x: torch.Tensor, codes: torch.Tensor,
                    x_sq: torch.Tensor, codes_sq: torch.Tensor) -> None:
        """Add one tensor to the step's statistics: ``M += X^T Z`` (fp32), the fidelity sums, the row sample."""
        cfg = self.config
        state.rank_used = codes.shape[1]
        rows, row_codes = x, codes
        if cfg.accumulate_stride > 1 and len(x) > cfg.accumulate_stride:
            # A random offset per tensor, so a row layout with a period dividing the stride (tokens of a
            # sequence) is still covered across the step's tensors.
            start = int(torch.randint(cfg.accumulate_stride, (), generator=self.generator))
            rows, row_codes = x[start :: cfg.accumulate_stride], codes[start :: cfg.accumulate_stride]
        if state.accumulator is None:
            state.accumulator = (rows.T @ row_codes).float()  # (D, k)
            state.x_sq, state.codes_sq = x_sq, codes_sq
        else:
            if rows.dtype == torch.float32:
                state.accumulator.addmm_(rows.T, row_codes)
            else:  # bf16 product (fp32 inside the matmul), summed across tensors in fp32
                state.accumulator.add_(rows.T @ row_codes)
            state.x_sq, state.codes_sq = state.x_sq + x_sq, state.codes_sq + codes_sq
        reset_possible = state.low_steps >= cfg.patience - 1
        capacity = cfg.reset_rows if reset_possible or cfg.power_iters > 1 else cfg.growth
        state.sample, state.sample_keys = subspace.sample_rows(
            x, capacity, self.generator, state.sample, state.sample_keys
        )

    # ------------------------------------------------------------- between steps
    def update(self) -> None:
        cfg = self.config
        if cfg.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._synchronize()
        for state in self.sites.values():
            self._update_site(state)
            state.clear_step()

    def _update_site(self, state: SiteState) -> None:
        """Algorithm 1 for one site: initialise, or power step / expand / reset by the step's fidelity."""
        cfg = self.config
        if state.basis is None:
            if state.sample is not None:
                state.basis = subspace.top_k_basis(state.sample, cfg.rank, self.generator)
            return
        if state.accumulator is None:
            return
        if not torch.isfinite(state.x_sq + state.codes_sq):
            state.nonfinite_steps += 1  # NaN/Inf reached the statistics: keep the basis as it is
            return
        state.fidelity = float(subspace.fidelity(state.codes_sq, state.x_sq))
        if state.fidelity >= cfg.threshold:
            basis = subspace.power_step(state.accumulator)
            for _ in range(cfg.power_iters - 1):
                basis = subspace.power_step(state.sample.T @ (state.sample @ basis))
            state.basis, state.low_steps = basis, 0
        else:
            state.low_steps += 1
            if state.low_steps >= cfg.patience:
                state.basis = subspace.top_k_basis(state.sample, cfg.rank, self.generator)
                state.low_steps = 0
                state.resets += 1
            else:
                rows = subspace.top_rows(state.sample, state.sample_keys, cfg.growth)
                state.basis = subspace.expand(state.basis, rows, cfg.max_rank)
                state.expansions += 1

    def _synchronize(self) -> None:
        """Make every rank see the statistics of all ranks, so all make the same basis update.

        Accumulators and fidelity sums are all-reduced; row samples are all-gathered and the rows with the
        largest keys kept, which is again a uniform sample of the union. Sites are visited in name order;
        a rank that saw nothing at a site contributes zeros.
        """
        for name in sorted(self.sites):
            state = self.sites[name]
            if state.frozen:
                continue
            if state.basis is None:
                device = state.sample.device if state.sample is not None else torch.device("cpu")
                state.sample, state.sample_keys = self._gather_sample(state, state.dim, device)
                continue
            d, k = state.basis.shape
            device = state.basis.device
            stats = torch.zeros(d * k + 2, device=device)
            if state.accumulator is not None:
                stats = torch.cat([state.accumulator.flatten(), state.x_sq.view(1), state.codes_sq.view(1)])
            dist.all_reduce(stats)
            if stats[-2] == 0:
                state.clear_step()
                continue
            state.accumulator, state.x_sq, state.codes_sq = stats[:-2].view(d, k), stats[-2], stats[-1]
            state.sample, state.sample_keys = self._gather_sample(state, d, device)

    def _gather_sample(self, state: SiteState, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        capacity = self.config.reset_rows
        rows = torch.zeros(capacity, dim, device=device)
        # -1: an empty slot, never selected over a real row
        keys = torch.full((capacity,), -1.0, dtype=torch.float64, device=device)
        if state.sample is not None:
            rows[: len(state.sample)] = state.sample
            keys[: len(state.sample)] = state.sample_keys.to(device)
        world = dist.get_world_size()
        all_rows = [torch.empty_like(rows) for _ in range(world)]
        all_keys = [torch.empty_like(keys) for _ in range(world)]
        dist.all_gather(all_rows, rows)
        dist.all_gather(all_keys, keys)
        rows, keys = torch.cat(all_rows), torch.cat(all_keys).cpu()
        sampled = 0 if state.sample is None else len(state.sample)
        # the capacity this step sampled with: growth rows, or reset_rows at initialisation / before a reset
        keep = self.config.reset_rows if state.basis is None or sampled > self.config.growth else self.config.growth
        top = torch.topk(keys, min(keep, int((keys >= 0).sum()))).indices
        return rows[top.to(device)], keys[top]

    # ------------------------------------------------------------------ report
    def site_row(self, site: str, account: SiteAccount) -> SiteReport:
        state = self.sites.get(site)
        if state is None or state.basis is None:
            return super().site_row(site, account)
        rank = state.rank_used or state.basis.shape[1]
        fidelity = 1.0 if state.frozen else state.fidelity
        return SiteReport(site, account.dim, rank, fidelity, account.raw_bytes, account.stored_bytes,
                          account.tensors, state.expansions, state.resets, account.fallbacks)

    def extra_state(self) -> dict:
        return {site: {k: getattr(s, k) for k in PERSISTED} for site, s in self.sites.items()}

    def load_extra_state(self, state: dict) -> None:
        self.sites = {site: SiteState(**fields) for site, fields in state.items()}
