"""Collect saved activations from any model, and the per-site spectra and oracle fidelity built on them.

:class:`ActivationRecorder` is an activation-memory method that compresses nothing: it sees exactly the
tensors autograd saves for backward (parameters excluded, one record per unique storage, named by site like
every method) and keeps a seeded uniform row sample of each site, optionally split by recursion step.

>>> acts = collect_activations(model, batches, lambda m, b: m(b).sum(), max_rows=4096)   # doctest: +SKIP
>>> spectra = site_spectra(acts)                       # summarize + oracle fidelity (Figure 4) per site
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from laser import subspace
from laser.analysis.spectra import SUMMARY_RANKS, SpectrumSummary, pca_fidelity, summarize
from laser.config import NoneConfig, SiteFilter
from laser.hooks import ActivationMethod, Packed, Reason

FIDELITY_BITS = (8, 16, 32)  # code precisions of Figure 4: int8, bf16, fp32
DEFAULT_MAX_ROWS = 4096


class _CountCalls:
    """Forward pre-hook counting a module's calls with grad enabled (the calls that save activations)."""

    def __init__(self, local: threading.local, label: str) -> None:
        self.local, self.label = local, label

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            calls = self.local.__dict__.setdefault("calls", {})
            calls[self.label] = calls.get(self.label, 0) + 1

    def __deepcopy__(self, memo: dict) -> _CountCalls:
        return self  # like the site namer's hooks: a deep-copied model keeps sharing them


class ActivationRecorder(ActivationMethod):
    """Records a uniform row sample of every admitted saved activation; stores everything raw.

    Each admitted storage is viewed as ``(N, D)`` (``D``: the site's width) and its rows join the site's
    sample: every row draws a key from a seeded generator and the ``max_rows`` rows with the largest keys are
    kept (a uniform sample without replacement over everything the site saw). With ``per_step``, rows are
    also sampled per *recursion step*: the number of times the site's module has been entered with grad
    enabled since the outermost ``with recorder:`` began, minus one. For a weight-tied block run ``n`` times
    in one forward the steps are ``0..n-1``; several storages saved during one call (q, k and v of one
    attention) share that call's step. Sites of tensors saved outside every module have step 0.

    Training is unchanged: :meth:`encode` returns ``None``, so autograd keeps the original tensors.
    Under activation checkpointing the recomputed tensors are saved by checkpoint's own hooks and are not
    seen.

    >>> recorder = ActivationRecorder(model, max_rows=2048, per_step=True)   # doctest: +SKIP
    >>> with recorder:
    ...     model(x)
    >>> recorder.activations()["block.mlp:512"].shape, sorted(recorder.step_activations()["block.mlp:512"])
    """

    name = "record"

    def __init__(
        self,
        model: nn.Module,
        max_rows: int = DEFAULT_MAX_ROWS,
        per_step: bool = False,
        seed: int = 0,
        config: SiteFilter | None = None,
    ) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive int (rows kept per site), got {max_rows!r}")
        super().__init__(model, config if config is not None else NoneConfig())
        self.max_rows = max_rows
        self.per_step = per_step
        self.sample_generator = torch.Generator().manual_seed(seed)
        self.rows_seen: dict[str, int] = {}
        self._samples: dict[str, tuple[Tensor, Tensor]] = {}
        self._step_samples: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
        self._calls = threading.local()
        self._call_handles = [
            module.register_forward_pre_hook(_CountCalls(self._calls, name or type(module).__name__))
            for name, module in model.named_modules()
        ]

    def __enter__(self) -> ActivationRecorder:
        if not self.active_in_thread():
            self._calls.calls = {}
        return super().__enter__()

    def encode(self, x: Tensor, site: str) -> Packed | str:
        """Add the rows of ``x`` ``(N, D)`` to the samples of ``site``; always keeps ``x`` raw."""
        self.rows_seen[site] = self.rows_seen.get(site, 0) + x.shape[0]
        self._samples[site] = subspace.sample_rows(x, self.max_rows, self.sample_generator, *self._samples.get(
            site, (None, None)))
        if self.per_step:
            module = site_module(site)
            step = max(getattr(self._calls, "calls", {}).get(module, 0) - 1, 0)
            steps = self._step_samples.setdefault(site, {})
            steps[step] = subspace.sample_rows(x, self.max_rows, self.sample_generator, *steps.get(step, (None, None)))
        return Reason.RAW

    def activations(self) -> dict[str, Tensor]:
        """Recorded rows per site: fp32 ``(min(max_rows, rows seen), D)``, sites sorted by name."""
        return {site: self._samples[site][0] for site in sorted(self._samples)}

    def step_activations(self) -> dict[str, dict[int, Tensor]]:
        """Recorded rows per site and recursion step (empty unless ``per_step``); steps in ascending order."""
        return {
            site: {step: rows for step, (rows, _) in sorted(self._step_samples[site].items())}
            for site in sorted(self._step_samples)
        }

    def remove(self) -> None:
        """Detach every hook, the call counters included."""
        super().remove()
        for handle in self._call_handles:
            handle.remove()
        self._call_handles.clear()


def collect_activations(
    model: nn.Module,
    batches: Iterable[object],
    forward_fn: Callable[[nn.Module, object], object],
    max_rows: int = DEFAULT_MAX_ROWS,
    per_step: bool = False,
    seed: int = 0,
    **filter_options: object,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, dict[int, Tensor]]]:
    """Row samples of the activations ``model`` saves for backward while ``forward_fn(model, batch)`` runs.

    ``forward_fn`` runs once per batch with grad enabled, each in its own ``with recorder:`` (so recursion
    steps restart at 0 for every batch); its result is dropped without a backward. ``filter_options`` are
    :class:`~laser.config.SiteFilter` settings (``min_numel``, ``min_dim``, ``include``, ``exclude``) choosing
    the recorded sites. Returns ``{site: (N, D) fp32}``, or with ``per_step`` the pair
    ``(by_site, {site: {step: (N_step, D)}})``. The model is left without hooks.
    """
    recorder = ActivationRecorder(model, max_rows, per_step, seed, NoneConfig(**filter_options))
    try:
        with torch.enable_grad():
            for batch in batches:
                with recorder:
                    forward_fn(model, batch)
    finally:
        recorder.remove()
    if per_step:
        return recorder.activations(), recorder.step_activations()
    return recorder.activations()


# -----------------------------------------------------------------------------
# which sites to study


def site_module(site: str) -> str:
    """Module path of a site name ``"<module path>/<op>:<width>"``."""
    return site.rsplit(":", 1)[0].split("/", 1)[0]


def site_dim(site: str) -> int:
    """Width ``D`` of a site name ``"<module path>/<op>:<width>"``."""
    return int(site.rsplit(":", 1)[1])


def main_sites(sites: Iterable[str], kinds: Sequence[str] = ("mlp", "attn")) -> dict[str, str]:
    """The widest site of each kind: ``{"mlp": ..., "attn": ...}`` (the paper's mlp_3072 and attn_1536).

    A site is of kind ``k`` when ``k`` is one of the dot-separated parts of its module path. Ties in width
    go to the site whose name sorts first; kinds with no site are left out.
    """
    chosen: dict[str, str] = {}
    for site in sorted(sites):
        parts = site_module(site).split(".")
        for kind in kinds:
            if kind in parts and (kind not in chosen or site_dim(site) > site_dim(chosen[kind])):
                chosen[kind] = site
    return chosen


# -----------------------------------------------------------------------------
# spectra and oracle fidelity (Figure 4)


def oracle_fidelity(
    x: Tensor, ranks: Sequence[int] = SUMMARY_RANKS, bits: Sequence[int] = FIDELITY_BITS
) -> dict[tuple[int, int], float]:
    """Figure 4's quantity: cosine between ``x`` ``(N, D)`` and its rank-``k`` PCA reconstruction (basis
    recomputed exactly for ``x``) with ``b``-bit codes, keyed ``(k, b)``.

    Ranks that do not compress (``k >= D``) or exceed the rows (``k > N``) are skipped.
    """
    n, d = x.shape
    return {(k, b): pca_fidelity(x, k, b) for k in ranks if k < d and k <= n for b in bits}


@dataclass(frozen=True)
class SiteSpectrum:
    """Spectrum summary of one site and its oracle fidelity ``{(rank, bits): cosine}``."""

    site: str
    summary: SpectrumSummary
    fidelity: dict[tuple[int, int], float]

    @property
    def energy_rank_ratio(self) -> float:
        """``D`` over the effective rank at 99% energy: how many times smaller the occupied subspace is."""
        return self.summary.dim / self.summary.effective_ranks[0.99]


def site_spectra(
    activations: dict[str, Tensor],
    sites: Iterable[str] | None = None,
    ranks: Sequence[int] = SUMMARY_RANKS,
    bits: Sequence[int] = FIDELITY_BITS,
) -> dict[str, SiteSpectrum]:
    """``summarize`` (effective ranks at 95% and 99% energy) and :func:`oracle_fidelity` of each site.

    ``sites`` defaults to every recorded site with at least two rows, two columns and a non-zero value.
    """
    if sites is None:  # a spectrum needs two rows, two columns and some energy
        sites = [s for s, x in activations.items() if min(x.shape) >= 2 and bool(x.any())]
    chosen = list(sites)
    missing = [s for s in chosen if s not in activations]
    if missing:
        raise ValueError(f"sites {missing} were not recorded; recorded sites: {sorted(activations)}")
    return {
        site: SiteSpectrum(site, summarize(activations[site]), oracle_fidelity(activations[site], ranks, bits))
        for site in chosen
    }


def spectra_at(
    model: nn.Module,
    batches: Iterable[object],
    forward_fn: Callable[[nn.Module, object], object],
    sites: Iterable[str] | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int = 0,
) -> dict[str, SiteSpectrum]:
    """Record ``model``'s activations on ``batches`` and return :func:`site_spectra` of ``sites``.

    One call per checkpoint gives the fidelity-over-training curves of Figure 4. ``sites`` defaults to
    :func:`main_sites` of what was recorded.
    """
    activations = collect_activations(model, batches, forward_fn, max_rows=max_rows, seed=seed)
    chosen = list(sites) if sites is not None else list(main_sites(activations).values())
    return site_spectra(activations, chosen)

