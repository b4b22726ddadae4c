"""Budget mode: state one target, get the LASER settings that meet it, measured on the model itself.

A target is one of: a floor on the whole-model gradient cosine against the exact gradient, a relative
reconstruction error per site, or a share of the baseline's saved-activation bytes. :func:`plan` measures
on a fixed batch the user's own step (``loss_fn(model)``) and returns a :class:`Plan`: the
:class:`~laser.config.LaserConfig` to build the compressor with, and what it protected (kept raw) and why.

* ``grad_cosine``: each coded site is probed alone (only it compressed) for its gradient cosine; a site
  under the floor by itself is protected; then, with everything else coded, the site that hurts most is
  protected until the whole-model cosine reaches the floor.
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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from laser.config import LaserConfig
from laser.methods.laser import Compressor


@dataclass(frozen=True)
class Target:
    """What the user asks of LASER: exactly one of the three.

    Attributes:
        grad_cosine: the least whole-model gradient cosine against the exact gradient, in (0, 1].
        max_error: the largest relative reconstruction error of any site, in (0, 1).
        stored_fraction: the largest share of the baseline's saved-activation bytes to keep, in (0, 1].
    """

    grad_cosine: float | None = None
    max_error: float | None = None
    stored_fraction: float | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("grad_cosine", "max_error", "stored_fraction") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("Target takes exactly one of grad_cosine, max_error, stored_fraction; "
                             f"got {given or 'none'}")
        value = getattr(self, given[0])
        ok = 0.0 < value < 1.0 if given[0] == "max_error" else 0.0 < value <= 1.0
        if not ok:
            allowed = "(0, 1)" if given[0] == "max_error" else "(0, 1]"
            raise ValueError(f"{given[0]}={value!r} is invalid: must be in {allowed}")


@dataclass
class Measurement:
    """One probe: the whole-model gradient cosine and the stored share of raw bytes, last probe step."""

    cosine: float
    stored_fraction: float


@dataclass
class Plan:
    """The settings that meet a :class:`Target`, with what they protect and what was measured.

    Attributes:
        config: the LaserConfig to build the compressor with (protected sites in ``exclude``).
        protected: site -> its gradient cosine when it alone is compressed (why it is kept raw).
        measured: the plan's own measurement.
        target: what was asked.
    """

    config: LaserConfig
    protected: dict[str, float] = field(default_factory=dict)
    measured: Measurement | None = None
    target: Target | None = None

    def __str__(self) -> str:
        lines = [f"plan for {self.target}: gradient cosine {self.measured.cosine:.4f}, "
                 f"stored {100 * self.measured.stored_fraction:.1f}% of raw"]
        if self.config.max_error is not None:
            lines.append(f"per-site ranks from max_error={self.config.max_error:.4g}")
        for site, cosine in sorted(self.protected.items(), key=lambda kv: kv[1]):
            lines.append(f"protected {site}: compressed alone it leaves gradient cosine {cosine:.4f}")
        return "\n".join(lines)


def plan(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], target: Target,
         config: LaserConfig | None = None, probe_steps: int = 3) -> Plan:
    """The LaserConfig meeting ``target`` on ``model``, measured with ``loss_fn(model)`` (a fixed batch).

    Each probe builds a compressor, runs ``probe_steps`` steps (no optimizer: the weights do not move) so
    the bases are tracked, and compares the last step's gradient with the exact one. The model is left as
    it was (hooks removed, gradients zeroed).
    """
    config = config if config is not None else LaserConfig()
    if probe_steps < 1:
        raise ValueError(f"probe_steps={probe_steps!r} is invalid: must be >= 1 (steps per probe)")
    exact = _gradient(model, loss_fn, None)
    measure = _Prober(model, loss_fn, exact, probe_steps)
    if target.max_error is not None:
        chosen = dataclasses.replace(config, max_error=target.max_error)
        return Plan(chosen, measured=measure(chosen)[0], target=target)
    if target.stored_fraction is not None:
        return _fit_bytes(config, target, measure)
    return _protect(config, target, measure)


def _protect(config: LaserConfig, target: Target, measure: _Prober) -> Plan:
    whole, coded = measure(config)
    alone = {site: measure(dataclasses.replace(config, include=(_literal(site),)))[0].cosine for site in coded}
    protected = {site: c for site, c in alone.items() if c < target.grad_cosine}
    while True:
        chosen = dataclasses.replace(config, exclude=(*config.exclude, *map(_literal, sorted(protected))))
        whole, coded = measure(chosen)
        if whole.cosine >= target.grad_cosine or not coded:
            return Plan(chosen, protected, whole, target)
        worst = min(coded, key=lambda site: alone.get(site, 1.0))
        protected[worst] = alone.get(worst, whole.cosine)


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

    def __init__(self, model: nn.Module, loss_fn: Callable, exact: torch.Tensor, steps: int) -> None:
        self.model, self.loss_fn, self.exact, self.steps = model, loss_fn, exact, steps

    def __call__(self, config: LaserConfig) -> tuple[Measurement, list[str]]:
        """The measurement of ``config`` and the sites that stored codes in the last step."""
        comp = Compressor(self.model, config)
        try:
            for _ in range(self.steps):
                grad = _gradient(self.model, self.loss_fn, comp)
                report = comp.report()
                comp.step()
        finally:
            comp.remove()
        cosine = float(torch.nn.functional.cosine_similarity(grad, self.exact, dim=0))
        stored = report.stored_bytes / report.raw_bytes if report.raw_bytes else 1.0
        coded = [row.name for row in report.sites if row.fallbacks < row.tensors]
        return Measurement(cosine if math.isfinite(cosine) else 0.0, stored), coded


def _gradient(model: nn.Module, loss_fn: Callable, method: Compressor | None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    if method is None:
        loss = loss_fn(model)
    else:
        with method:
            loss = loss_fn(model)
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads)


def _literal(site: str) -> str:
    """A glob pattern matching exactly ``site``."""
    return re.sub(r"([*?\[])", r"[\1]", site)
