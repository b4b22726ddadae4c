"""PNG figures for the analyses: spectra, fidelity over training, histograms, generic lines and scatters, and
the comparison's Pareto views and gradient cosine over training (the baseline marked in both).

Figures are built with matplotlib's object API on the Agg canvas (``matplotlib.figure.Figure``), so no
pyplot global state or interactive backend is touched. Each function writes one PNG (parent folders are
created) and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from laser.analysis.spectra import SpectrumSummary, cumulative_energy

DPI = 120


def _check_nonempty(data: dict, name: str) -> None:
    if not data:
        raise ValueError(f"{name} is empty: pass at least one labelled entry to plot")


def _finish(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _style(ax: Axes, xlabel: str, ylabel: str, title: str = "", legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize="small")


def plot_spectra(summaries: dict[str, SpectrumSummary], path: str | Path) -> Path:
    """Normalised singular values (log scale) and cumulative energy per site, one line per summary.

    Dotted horizontal lines mark the energy levels of the summaries' effective ranks.
    """
    _check_nonempty(summaries, "summaries")
    fig = Figure(figsize=(11, 4.2))
    decay, energy = fig.subplots(1, 2)
    levels: set[float] = set()
    for label, summary in summaries.items():
        sv = summary.singular_values.double().cpu()
        index = np.arange(1, sv.numel() + 1)
        decay.plot(index, (sv / sv[0]).numpy(), label=f"{label} (D={summary.dim})")
        ranks = ", ".join(f"{e:g}: {k}" for e, k in summary.effective_ranks.items())
        energy.plot(index, cumulative_energy(sv).numpy(), label=f"{label} (rank at {ranks})")
        levels.update(summary.effective_ranks)
    for level in sorted(levels):
        energy.axhline(level, color="grey", linestyle=":", linewidth=1)
    decay.set_yscale("log")
    _style(decay, "component i", "s_i / s_1", "singular value decay")
    energy.set_xscale("log")
    _style(energy, "rank k", "energy captured by top k", "cumulative energy")
    return _finish(fig, path)


def plot_fidelity_over_training(
    curves: dict[str, list[tuple[int, float]]],
    path: str | Path,
    title: str,
    threshold: float | None = None,
) -> Path:
    """Reconstruction cosine against training step, one line per setting (e.g. ``"k=128, 8-bit"``).

    ``threshold``, if given, is drawn as a dashed line (LASER's fidelity threshold).
    """
    _check_nonempty(curves, "curves")
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for label, points in curves.items():
        ordered = sorted(points)
        ax.plot([step for step, _ in ordered], [value for _, value in ordered], label=label, linewidth=1.5)
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    _style(ax, "training step", "reconstruction cosine", title)
    return _finish(fig, path)


def plot_histograms(
    hists: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, logy: bool = True
) -> Path:
    """Overlaid value histograms (as densities) with a Gaussian fitted to the first one.

    Each value is ``(counts, edges)`` as returned by ``laser.analysis.stats.histogram``. The Gaussian
    takes its mean and std from the first histogram's binned counts. A log y-axis shows the tails,
    where outliers would appear.
    """
    _check_nonempty(hists, "hists")
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    floor = math.inf  # smallest observed density, so the Gaussian's far tail does not set the y range
    for label, (counts, edges) in hists.items():
        counts, edges = np.asarray(counts, dtype=np.float64), np.asarray(edges, dtype=np.float64)
        if counts.ndim != 1 or edges.shape != (counts.size + 1,) or counts.sum() <= 0:
            raise ValueError(
                f"hists[{label!r}] must be (counts, edges) with len(edges) = len(counts) + 1 "
                "and a positive total count"
            )
        density = counts / (counts.sum() * np.diff(edges))
        floor = min(floor, density[density > 0].min())
        ax.stairs(density, edges, label=label, linewidth=1.5)
    reference, (counts, edges) = next(iter(hists.items()))
    counts, edges = np.asarray(counts, dtype=np.float64), np.asarray(edges, dtype=np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    mean = np.average(centers, weights=counts)
    std = math.sqrt(np.average((centers - mean) ** 2, weights=counts))
    grid = np.linspace(edges[0], edges[-1], 400)
    gaussian = np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    ax.plot(grid, gaussian, color="black", linestyle="--", linewidth=1, label=f"Gaussian fit ({reference})")
    if logy:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5 * floor)
    _style(ax, "activation value", "density", "activation histogram")
    return _finish(fig, path)


def plot_xy(
    series: dict[str, tuple[list, list]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
) -> Path:
    """Generic line plot with markers, one line per ``label: (xs, ys)`` (depth scaling, gradient fidelity)."""
    _check_nonempty(series, "series")
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for label, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"series[{label!r}] has {len(xs)} x values but {len(ys)} y values")
        ax.plot(xs, ys, marker="o", markersize=4, label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    _style(ax, xlabel, ylabel, title)
    return _finish(fig, path)


def plot_scatter(
    points: dict[str, tuple[float, float]], path: str | Path, xlabel: str, ylabel: str, title: str
) -> Path:
    """Scatter of labelled points ``label: (x, y)``, each annotated with its label (Pareto views)."""
    _check_nonempty(points, "points")
    fig = Figure(figsize=(7, 4.8))
    ax = fig.subplots()
    for label, (x, y) in points.items():
        ax.scatter([x], [y], s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize="small")
    ax.margins(0.15)  # room for the labels of points at the edges
    _style(ax, xlabel, ylabel, title, legend=False)
    return _finish(fig, path)


BASELINE_STYLE = {"marker": "*", "markersize": 14, "color": "black"}


def _baseline_label(label: str) -> str:
    return f"{label} (baseline)"


def pareto_figure(points: dict[str, dict[str, float]], baseline: str, trivial: float | None = None,
                  metric: str = "val solve rate (%)", trivial_label: str = "trivial (copy input)") -> Figure:
    """Memory against the headline metric and against step time, one point per method, the baseline a black star.

    ``points[label]`` holds ``memory`` (MiB, drawn on a log axis), ``solve`` and ``solve_std`` (the headline
    metric, named ``metric`` on its axis: the solve rate in %, or bits per byte), ``time`` and ``time_std``
    (step time over the baseline's). ``trivial``, if given, is a dashed line (``trivial_label``) on the metric's
    panel. Each point carries its label in the legend and beside it; the baseline's reads "LABEL (baseline)".
    """
    _check_nonempty(points, "points")
    fig = Figure(figsize=(11, 4.4))
    solve_ax, time_ax = fig.subplots(1, 2)
    for label, p in points.items():
        style = BASELINE_STYLE if label == baseline else {"marker": "o"}
        name = _baseline_label(label) if label == baseline else label
        for ax, y, err in ((solve_ax, p["solve"], p["solve_std"]), (time_ax, p["time"], p["time_std"])):
            ax.errorbar([p["memory"]], [y], yerr=[err], linestyle="none", label=name, **style)
            ax.annotate(name, (p["memory"], y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    if trivial is not None:
        solve_ax.axhline(trivial, color="gray", linestyle="--", label=trivial_label)
    # Log memory axis: the methods span two orders of magnitude and would crowd the left edge.
    for ax in (solve_ax, time_ax):
        ax.set_xscale("log")
        ax.margins(0.15)
    _style(solve_ax, "saved activations (MiB, log)", metric, f"Memory vs {metric.split(' (')[0].removeprefix('val ')}")
    _style(time_ax, "saved activations (MiB, log)", "step time / baseline", "Memory vs step time")
    return fig


def plot_pareto(points: dict[str, dict[str, float]], path: str | Path, baseline: str,
                trivial: float | None = None, metric: str = "val solve rate (%)",
                trivial_label: str = "trivial (copy input)") -> Path:
    """:func:`pareto_figure` written to ``path``."""
    return _finish(pareto_figure(points, baseline, trivial, metric, trivial_label), path)


def gradient_cosine_figure(curves: dict[str, list[tuple[int, float, float]]], baseline: str) -> Figure:
    """Whole-model gradient cosine against the exact gradient over training, one line per method.

    ``curves[label]`` is ``[(step, mean, std), ...]`` over seeds. Left: the cosine (error bars: std over
    seeds), the baseline a black dashed line of stars labelled "LABEL (baseline)". Right: ``1 - cosine`` on a
    log axis, where the near-1 cosines of the faithful methods separate (points at or within 1e-12 of an
    exact 1 cannot be drawn there and are left out). Methods without probe points are left out; with none at
    all the figure says so.
    """
    fig = Figure(figsize=(11, 4.4))
    cos_ax, gap_ax = fig.subplots(1, 2)
    drawn = {label: sorted(points) for label, points in curves.items() if points}
    if not drawn:
        for ax in (cos_ax, gap_ax):
            ax.text(0.5, 0.5, "no gradient probes in these runs (grad_probe_at=())", ha="center", va="center")
            ax.set_axis_off()
        return fig
    for label, points in drawn.items():
        steps, means, stds = (list(column) for column in zip(*points, strict=True))
        if label == baseline:
            style = {**BASELINE_STYLE, "markersize": 10, "linestyle": "--"}
            name = _baseline_label(label)
        else:
            style, name = {"marker": "o", "markersize": 4}, label
        cos_ax.errorbar(steps, means, yerr=stds, label=name, capsize=2, **style)
        gap = [(s, 1 - m) for s, m in zip(steps, means, strict=True) if 1 - m > 1e-12]
        if gap:
            gap_ax.plot(*zip(*gap, strict=True), label=name, **style)
    _style(cos_ax, "optimizer step", "gradient cosine (whole model)", "Gradient cosine vs the exact gradient")
    gap_ax.set_yscale("log")
    _style(gap_ax, "optimizer step", "1 - gradient cosine (log)", "Distance from the exact gradient",
           legend=bool(gap_ax.get_legend_handles_labels()[1]))
    return fig


def plot_gradient_cosine(curves: dict[str, list[tuple[int, float, float]]], path: str | Path,
                         baseline: str) -> Path:
    """:func:`gradient_cosine_figure` written to ``path``."""
    return _finish(gradient_cosine_figure(curves, baseline), path)
