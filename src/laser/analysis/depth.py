"""Saved-activation memory against recursion depth (paper section 3.4): measured bytes next to the model.

Standard backpropagation keeps every recursion step's activations, ``M_full(n) = O(n B D)``; LASER keeps
per-step codes and one basis per site, ``M_LASER(n) = O(n B k + D k)``. Both are measured here from the
methods' reports (bytes of unique storages kept by the autograd graph) for a model built at each depth,
LASER from a given compressor state or after warm-up steps, and set against those forms with their constants
taken from the smallest depth:

    M_full(n)  = M_full(n0) * n / n0
    M_LASER(n) = (M_LASER(n0) - bases(n0)) * n / n0 + bases(n0)      bases = sum over sites of D * k * 4 B

What the forms leave out (activations saved once per forward, outside the loop, and rank changes) shows as
the gap between measured and predicted bytes. Least-squares lines give each method's bytes per step.

>>> result = depth_scaling(lambda n: build_model(depth=n), batch, loss_fn, depths=(4, 8, 16))   # doctest: +SKIP
>>> result.baseline_fit.slope, result.laser_fit.slope
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor, nn

from laser.analysis.gradients import load_compressor, parameter_gradient, warm_compressor
from laser.methods import build
from laser.report import Report, SiteReport

DEPTHS = (4, 8, 16, 24, 48)
BASIS_BYTES_PER_ELEMENT = 4  # LASER keeps bases in fp32


@dataclass(frozen=True)
class LinearFit:
    """Least-squares line ``bytes = intercept + slope * depth`` and its coefficient of determination."""

    intercept: float
    slope: float
    r2: float


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    """Fit ``y = intercept + slope * x`` by least squares (``r2 = 1`` for a perfect or constant fit)."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape or x.size < 2 or np.unique(x).size < 2:
        raise ValueError(f"need at least two distinct x values with one y each, got xs={list(xs)}, ys={list(ys)}")
    dx = x - x.mean()
    slope = float(dx @ (y - y.mean()) / (dx @ dx))
    intercept = float(y.mean() - slope * x.mean())
    residual = float(np.square(y - (intercept + slope * x)).sum())
    total = float(np.square(y - y.mean()).sum())
    return LinearFit(intercept, slope, 1.0 - residual / total if total > 0 else 1.0)


def coded(row: SiteReport) -> bool:
    """Whether a site stored at least one storage as codes in its step."""
    return row.fallbacks < row.tensors


def basis_bytes(report: Report) -> int:
    """Bytes that do not grow with depth at the sites that stored codes: their fp32 bases and LASER's own
    per-site state (accumulator, row sample)."""
    return sum(row.dim * row.rank * BASIS_BYTES_PER_ELEMENT + row.state_bytes for row in report.sites if coded(row))


@dataclass(frozen=True)
class DepthPoint:
    """Measured saved-activation bytes at one recursion depth.

    Attributes:
        depth: recursion depth ``n``.
        baseline_bytes: bytes autograd keeps without compression (the ``none`` method's report).
        laser_bytes: bytes kept with LASER after warm-up (codes, bases, raw fallbacks).
        laser_basis_bytes: the part of ``laser_bytes`` that does not grow with depth (bases, LASER's state).
        ranks: rank per site LASER stored codes with.
    """

    depth: int
    baseline_bytes: int
    laser_bytes: int
    laser_basis_bytes: int
    ranks: dict[str, int]


@dataclass(frozen=True)
class DepthScaling:
    """Bytes against depth, the O-forms with constants from the smallest depth, and line fits."""

    points: list[DepthPoint]
    predicted_baseline: list[float]
    predicted_laser: list[float]
    baseline_fit: LinearFit
    laser_fit: LinearFit

    @property
    def slope_ratio(self) -> float:
        """LASER's bytes per recursion step over the baseline's (below 1: LASER's memory grows slower)."""
        return self.laser_fit.slope / self.baseline_fit.slope


def predict(points: Sequence[DepthPoint]) -> tuple[list[float], list[float]]:
    """``M_full(n) = M_full(n0) n / n0`` and ``M_LASER(n) = (M_LASER(n0) - bases) n / n0 + bases``, with
    ``n0`` the smallest depth of ``points``."""
    first = min(points, key=lambda p: p.depth)
    per_step_full = first.baseline_bytes / first.depth
    per_step_laser = (first.laser_bytes - first.laser_basis_bytes) / first.depth
    full = [per_step_full * p.depth for p in points]
    laser = [per_step_laser * p.depth + first.laser_basis_bytes for p in points]
    return full, laser


def measure_depth(model: nn.Module, batch: object, loss_fn: Callable[[nn.Module, object], Tensor],
                  warmup: int = 2, state: dict | None = None, **laser_options: object) -> tuple[Report, Report]:
    """Reports of one forward + backward of ``loss_fn(model, batch)``: baseline, then LASER (loaded with the
    compressor ``state`` when given, else after ``warmup`` steps on the same batch)."""
    baseline = build("none", model)
    try:
        parameter_gradient(model, [batch], loss_fn, baseline)
        baseline_report = baseline.report()
    finally:
        baseline.remove()
    if state is None:
        comp = warm_compressor(model, [batch], loss_fn, warmup, **laser_options)
    else:
        comp = load_compressor(model, state, **laser_options)
    try:
        parameter_gradient(model, [batch], loss_fn, comp)
        return baseline_report, comp.report()
    finally:
        comp.remove()


def depth_scaling(
    model_at_depth: Callable[[int], nn.Module],
    batch: object,
    loss_fn: Callable[[nn.Module, object], Tensor],
    depths: Sequence[int] = DEPTHS,
    warmup: int = 2,
    state: dict | None = None,
    **laser_options: object,
) -> DepthScaling:
    """Measure saved-activation bytes of baseline and LASER at each of ``depths``.

    ``model_at_depth(n)`` returns the model unrolled ``n`` recursion steps (for a weight-tied model, the
    same weights at every depth); ``loss_fn(model, batch)`` returns a scalar loss. ``laser_options`` are
    LASER config fields. LASER starts from the compressor ``state`` when given (e.g. a trained run's, so
    every depth uses the same bases and ranks), else from ``warmup`` steps at each depth.
    """
    depths = sorted(set(depths))
    if len(depths) < 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in depths):
        raise ValueError(f"depths must hold at least two distinct positive ints, got {depths!r}")
    points = []
    for n in depths:
        baseline, laser = measure_depth(model_at_depth(n), batch, loss_fn, warmup, state, **laser_options)
        ranks = {row.name: row.rank for row in laser.sites if coded(row)}
        points.append(DepthPoint(n, baseline.stored_bytes, laser.stored_bytes, basis_bytes(laser), ranks))
    predicted_full, predicted_laser = predict(points)
    return DepthScaling(
        points=points,
        predicted_baseline=predicted_full,
        predicted_laser=predicted_laser,
        baseline_fit=linear_fit(depths, [p.baseline_bytes for p in points]),
        laser_fit=linear_fit(depths, [p.laser_bytes for p in points]),
    )
