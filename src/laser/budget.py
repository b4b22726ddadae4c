"""Budget mode: state one target, get the LASER settings that meet it, measured on the model itself.

A target is one of: a floor on the whole-model gradient cosine against the exact gradient, a floor on every
parameter tensor's own gradient cosine, a relative reconstruction error per site, or a share of the baseline's
saved-activation bytes. :func:`plan` measures
on a fixed batch the user's own step (``loss_fn(model)``) and returns a :class:`Plan`: the
:class:`~laser.config.LaserConfig` to build the compressor with, and what it protected (kept raw) and why.

* ``grad_cosine``: each coded site is probed alone (only it compressed) for its gradient cosine. While the
  whole model, everything coded, is under the floor, the site that hurts most alone gets twice its rank
  (``LaserConfig.site_ranks``, at most its width) and is probed alone again. A site is protected (kept raw)
  instead where the raised rank would store half its raw bytes or more (where codes no longer save enough to
  be worth their error; estimated from the share its codes and basis take at its measured rank, so int8 codes
  may grow to full width), where it is already at full width, or where the rank would pass the user's ``max_rank``.
* ``tensor_cosine``: the same, against the least faithful parameter tensor's gradient cosine. The whole-model
  cosine is dominated by the tensors with the largest gradients and can stay above 0.99 while a small tensor's
  gradient is far off; Adam scales each coordinate by its own history, so it follows that tensor's error all
  the same.
* ``max_error``: every site gets the smallest rank whose SVD error on its sampled rows is at most this
  (``LaserConfig.max_error``); nothing else to measure but the result.
* ``stored_fraction``: the smallest ``max_error`` on a log grid whose measured stored bytes are within the
  budget.

>>> target = laser.Target(grad_cosine=0.99)                               # doctest: +SKIP
>>> plan = laser.plan(model, lambda m: loss_fn(m(x), y), target, laser.LaserConfig(rank=32))
>>> print(plan)                                # what was protected and why, the measured cosine and bytes
>>> comp = laser.Compressor(model, plan.config)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from laser.analysis.gradients import least_faithful, parameter_gradient
from laser.config import LaserConfig
from laser.methods.laser import Compressor


@dataclass(frozen=True)
class Target:
    """What the user asks of LASER: exactly one of the four.

    Attributes:
        grad_cosine: the least whole-model gradient cosine against the exact gradient, in (0, 1].
        tensor_cosine: the least gradient cosine of any single trainable parameter tensor, in (0, 1].
        max_error: the largest relative reconstruction error of any site, in (0, 1).
        stored_fraction: the largest share of the baseline's saved-activation bytes to keep, in (0, 1].
    """

    grad_cosine: float | None = None
    tensor_cosine: float | None = None
    max_error: float | None = None
    stored_fraction: float | None = None

    def __post_init__(self) -> None:
        names = ("grad_cosine", "tensor_cosine", "max_error", "stored_fraction")
        given = [name for name in names if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"Target takes exactly one of {', '.join(names)}; got {given or 'none'}")
        value = getattr(self, given[0])
        ok = 0.0 < value < 1.0 if given[0] == "max_error" else 0.0 < value <= 1.0
        if not ok:
            allowed = "(0, 1)" if given[0] == "max_error" else "(0, 1]"
            raise ValueError(f"{given[0]}={value!r} is invalid: must be in {allowed}")


@dataclass
class Measurement:
    """One probe, at its last step: the whole-model gradient cosine, the stored share of raw bytes, and the
    parameter tensor whose gradient is least faithful with its cosine."""

    cosine: float
    stored_fraction: float
    worst_tensor: str = ""
    tensor_cosine: float = 1.0


@dataclass
class Plan:
    """The settings that meet a :class:`Target`, with what they protect and what was measured.

    Attributes:
        config: the LaserConfig to build the compressor with (protected sites in ``exclude``, raised ranks
            first in ``site_ranks``).
        protected: site -> its gradient cosine when it alone is compressed (why it is kept raw); under a
            ``tensor_cosine`` target, the least faithful tensor's.
        raised: site -> ``(rank, cosine)``: the rank it was given and its gradient cosine alone at the rank
            it had before (why it was raised), measured as ``protected`` is.
        measured: the plan's own measurement.
        target: what was asked.
    """

    config: LaserConfig
    protected: dict[str, float] = field(default_factory=dict)
    raised: dict[str, tuple[int, float]] = field(default_factory=dict)
    measured: Measurement | None = None
    target: Target | None = None

    def __str__(self) -> str:
        measured = self.measured
        lines = [f"plan for {self.target}: gradient cosine {measured.cosine:.4f} (least faithful tensor "
                 f"{measured.worst_tensor} {measured.tensor_cosine:.4f}), "
                 f"stored {100 * measured.stored_fraction:.1f}% of raw"]
        if self.config.max_error is not None:
            lines.append(f"per-site ranks from max_error={self.config.max_error:.4g}")
        for site, (rank, cosine) in sorted(self.raised.items(), key=lambda kv: kv[1][1]):
            lines.append(f"rank {rank} at {site}: compressed alone at half that it leaves gradient cosine {cosine:.4f}")
        for site, cosine in sorted(self.protected.items(), key=lambda kv: kv[1]):
            lines.append(f"protected {site}: compressed alone it leaves gradient cosine {cosine:.4f}")
        return "\n".join(lines)


def plan(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], target: Target,
         config: LaserConfig | None = None, probe_steps: int = 3,
         warmup: Sequence[Callable[[nn.Module], torch.Tensor]] | None = None) -> Plan:
    """The LaserConfig meeting ``target`` on ``model``, measured with ``loss_fn(model)`` (a fixed batch).

    Each probe builds a compressor and tracks its bases over warm-up steps (no optimizer: the weights do not
    move), then compares its gradient of ``loss_fn`` with the exact one. The warm-up steps are ``warmup``'s
    losses when given (other batches than the measured one, as in training, where a basis codes a batch it
    was not tracked on), else ``probe_steps - 1`` steps of ``loss_fn`` itself. The model is left as it was
    (hooks removed, gradients zeroed).
    """
    config = config if config is not None else LaserConfig()
    if probe_steps < 1:
        raise ValueError(f"probe_steps={probe_steps!r} is invalid: must be >= 1 (steps per probe)")
    warmup = list(warmup) if warmup is not None else [loss_fn] * (probe_steps - 1)
    exact = _gradient(model, loss_fn, None)
    measure = _Prober(model, loss_fn, exact, warmup)
    if target.max_error is not None:
        chosen = dataclasses.replace(config, max_error=target.max_error)
        return Plan(chosen, measured=measure(chosen)[0], target=target)
    if target.stored_fraction is not None:
        return _fit_bytes(config, target, measure)
    return _protect(config, target, measure)


def _protect(config: LaserConfig, target: Target, measure: _Prober) -> Plan:
    """Raise the rank of, or protect, the site that hurts most alone until the cosine floor holds."""
    per_tensor = target.tensor_cosine is not None
    floor = target.tensor_cosine if per_tensor else target.grad_cosine

    def score(measured: Measurement) -> float:
        return measured.tensor_cosine if per_tensor else measured.cosine

    ranks: dict[str, int] = {}  # site -> the rank the plan gives it
    protected: dict[str, float] = {}
    raised: dict[str, tuple[int, float]] = {}

    def planned(**extra: object) -> LaserConfig:
        entries = tuple(f"{_literal(site)}={rank}" for site, rank in ranks.items())
        return dataclasses.replace(config, site_ranks=(*entries, *config.site_ranks),
                                   exclude=(*config.exclude, *map(_literal, sorted(protected))), **extra)

    def alone(site: str) -> float:
        return score(measure(planned(include=(_literal(site),)))[0])

    whole, coded = measure(config)
    cosines = {site: alone(site) for site in coded}
    while score(whole) < floor and coded:
        site = min(coded, key=lambda name: cosines.get(name, 1.0))
        dim, measured_rank, share = coded[site]
        now = ranks.get(site, config.rank_for(site))
        rank = min(2 * now, dim)
        too_dear = rank <= now or share * rank / max(measured_rank, 1) >= 0.5
        if too_dear or (config.max_rank is not None and rank > config.max_rank):
            protected[site] = cosines.pop(site, score(whole))
            raised.pop(site, None)
            ranks.pop(site, None)
        else:
            ranks[site] = rank
            raised[site] = (rank, cosines.get(site, score(whole)))
            cosines[site] = alone(site)
        whole, coded = measure(planned())
    return Plan(planned(), protected, raised, whole, target)


def _fit_bytes(config: LaserConfig, target: Target, measure: _Prober) -> Plan:
    best = None
    for max_error in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9):
        chosen = dataclasses.replace(config, max_error=max_error)
        measured, _ = measure(chosen)
        best = Plan(chosen, measured=measured, target=target)
        if measured.stored_fraction <= target.stored_fraction:
            return best
    return best  # the budget cannot be met by ranks alone: the loosest plan, its bytes measured


class _Prober:
    """Runs probes of configs against the exact gradient."""

    def __init__(self, model: nn.Module, loss_fn: Callable, exact: torch.Tensor, warmup: list[Callable]) -> None:
        self.model, self.loss_fn, self.exact, self.warmup = model, loss_fn, exact, warmup

    def __call__(self, config: LaserConfig) -> tuple[Measurement, dict[str, tuple[int, int, float]]]:
        """The measurement of ``config`` and the sites that stored codes in the last step, each with its width,
        its rank and the share of its raw bytes its codes and basis took (LASER's per-step state left out: it
        does not grow with the codes)."""
        comp = Compressor(self.model, config)
        try:
            for loss_fn in self.warmup:
                _gradient(self.model, loss_fn, comp)
                comp.step()
            grad = _gradient(self.model, self.loss_fn, comp)
            report = comp.report()
            comp.step()
        finally:
            comp.remove()
        cosine = float(torch.nn.functional.cosine_similarity(grad, self.exact, dim=0))
        worst, _ = least_faithful(grad, self.exact, self.model)
        stored = report.stored_bytes / report.raw_bytes if report.raw_bytes else 1.0
        coded = {row.name: (row.dim, row.rank, (row.stored_bytes - row.state_bytes) / row.raw_bytes)
                 for row in report.sites if row.fallbacks < row.tensors and row.raw_bytes}
        finite = [value if math.isfinite(value) else 0.0 for value in (cosine, worst.cosine)]
        return Measurement(finite[0], stored, worst.name, finite[1]), coded


def _gradient(model: nn.Module, loss_fn: Callable, method: Compressor | None) -> torch.Tensor:
    """The flat gradient of ``loss_fn(model)`` over the trainable parameters; ``.grad`` fields untouched."""
    return parameter_gradient(model, [None], lambda m, _: loss_fn(m), method)


def _literal(site: str) -> str:
    """A glob pattern matching exactly ``site``."""
    return re.sub(r"([*?\[])", r"[\1]", site)
