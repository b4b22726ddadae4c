"""Head-to-head comparison of activation-memory methods: same data, same init, same seeds.

The headline metric is the task's (:mod:`laser.train.tasks`): the maze solve rate (higher is better) or the
text task's validation bits per byte (lower is better); every test, "who wins" line and plot follows its
direction, and each entry of results.json names it under ``metric``.

Each (method, seed) trains in a fresh process (:mod:`laser.train.worker`), so its CPU peak memory is its own.
The comparison writes ``OUT/results.json`` (one entry per method), ``OUT/report.md`` (table, per-site rows,
plots, config, wall time) and ``OUT/config.json``.

>>> results = compare(train_preset("tiny"), ["none", "laser:rank=4"], seeds=2, out_dir="runs/demo")  # doctest: +SKIP
>>> results["laser:rank=4"]["solve_rate"]["mean"]
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from laser.analysis.stats import WELCH_TEST, SeedDifference, seed_difference
from laser.report import format_bytes
from laser.train import tasks
from laser.train.config import (
    MethodSpec,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    parse_method_spec,
    result_relevant,
    with_method,
)
from laser.train.tasks import Metric
from laser.train.trainer import CHECKPOINT_NAME, write_json

PAPER_SEEDS = (100, 101, 102, 103, 104)
DEFAULT_METHODS = ("none", "laser", "laser:quantize=int8")
BASELINE = "none"


# --------------------------------------------------------------------------------------------- statistics
def summarize(values: Sequence[float]) -> dict:
    """``{"mean", "std", "per_seed"}`` of per-seed values (sample std, 0 for a single seed)."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Welch t-test p-value of ``a`` against ``b``; None with fewer than 2 values each or no variance."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2 or (statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0):
        return None
    p = float(stats.ttest_ind(list(a), list(b), equal_var=False).pvalue)
    return None if math.isnan(p) else p


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """The first ``seeds`` of the paper's seeds 100-104 (continuing upwards past five), or the seeds given."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds={seeds} is invalid: need at least 1")
        return [PAPER_SEEDS[0] + i for i in range(seeds)]
    return [int(s) for s in seeds]


# ------------------------------------------------------------------------------------------------- runs
def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "method"


def finished_result(cfg: TrainConfig, run_dir: Path) -> dict | None:
    """The result a finished run of ``cfg`` left in ``run_dir``, or None (missing, or other settings).

    Bookkeeping settings (where files go, the progress bar, ...: those a trainer may resume with other
    values) are not compared: the same folder reached by a relative or an absolute path holds the same run.
    """
    config_path, result_path = run_dir / "config.json", run_dir / "result.json"
    if not (result_path.is_file() and _saved_config_is(cfg, config_path)):
        return None
    return json.loads(result_path.read_text())


def _saved_config_is(cfg: TrainConfig, config_path: Path) -> bool:
    """Whether the run config saved at ``config_path`` has ``cfg``'s result-relevant settings."""
    if not config_path.is_file():
        return False
    try:  # through the config classes: a setting added since the run was saved takes its default
        saved = _comparable(config_from_dict(json.loads(config_path.read_text())))
    except (ValueError, TypeError):
        return False
    return saved == _comparable(cfg)


def _comparable(cfg: TrainConfig) -> dict:
    """What decides a run's result (:func:`result_relevant`), as plain JSON data (tuples as lists)."""
    return json.loads(json.dumps(result_relevant(config_to_dict(cfg))))


def run_worker(cfg: TrainConfig, run_dir: Path, threads: int = 0, resume: bool = False) -> dict:
    """Train ``cfg`` in a fresh Python process writing into ``run_dir``; returns its result dict.

    With ``resume``, a run interrupted in ``run_dir`` with the same settings continues from its checkpoint
    (bitwise as if uninterrupted, :class:`~laser.train.trainer.Trainer`); any other checkpoint there is removed
    first, so a later resume never meets one saved with other settings.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path, result_path, log_path = run_dir / "config.json", run_dir / "result.json", run_dir / "worker.log"
    checkpoint = run_dir / CHECKPOINT_NAME
    result_path.unlink(missing_ok=True)  # before the config: a crash in between never pairs new settings with it
    resume = resume and checkpoint.is_file() and _saved_config_is(cfg, config_path)
    if not resume:
        checkpoint.unlink(missing_ok=True)
    write_json(config_path, config_to_dict(cfg))
    command = [sys.executable, "-m", "laser.train.worker", str(config_path), str(result_path), str(threads)]
    with open(log_path, "a" if resume else "w") as log:
        code = subprocess.run([*command, *(["--resume"] if resume else [])], stdout=log, stderr=subprocess.STDOUT,
                              env=os.environ.copy()).returncode
    if code != 0 or not result_path.exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"training run in {run_dir} failed (exit code {code}); last lines of {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def default_jobs(cfg: TrainConfig, runs: int) -> int:
    """Runs trained at once by default: one on a GPU (they would share it), else one per CPU core.

    One thread per run on a small CPU model is faster than several threads per run, and it keeps a busy
    machine from oversubscribing its cores (OpenMP's spin-waiting then slows small kernels down badly).
    """
    if cfg.device.startswith("cuda") or (cfg.device == "auto" and _cuda_available()):
        return 1
    return max(1, min(runs, os.cpu_count() or 1))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def compare(
    cfg: TrainConfig,
    methods: Sequence[str | MethodSpec] = DEFAULT_METHODS,
    seeds: int | Sequence[int] = 2,
    out_dir: str | Path = "runs/compare",
    jobs: int = 0,
    threads: int = 0,
    preset: str = "",
    log: Callable[[str], None] = print,
    resume: bool = False,
) -> dict:
    """Train every method for every seed from ``cfg`` and write results.json, report.md and plots.

    Args:
        cfg: the shared settings; each run gets the method of its spec and the seed.
        methods: method specs (``"laser:rank=64,quantize=int8"``, ``"none+checkpoint"``); the baseline is
            ``"none"`` when listed, else the first.
        seeds: how many of the seeds 100, 101, ... (or the seeds themselves).
        out_dir: the output folder.
        jobs: runs trained at once, each in its own process (0: :func:`default_jobs`).
        threads: torch threads per run (0: the CPU cores divided among the jobs).
        preset: the preset's name, for the report.
        log: where progress lines go.
        resume: reuse every run in ``out_dir`` that finished with exactly the planned settings, and continue
            every run interrupted with them from its last checkpoint (an interrupted comparison goes on where
            it stopped); the others are trained anew.

    Returns the results dict written to results.json: ``{method label: entry}``.
    """
    specs = [parse_method_spec(m) if isinstance(m, str) else m for m in methods]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods={labels} is invalid: each method may be listed once")
    seeds = seed_list(seeds)
    jobs = jobs or default_jobs(cfg, len(specs) * len(seeds))
    if jobs < 1:
        raise ValueError(f"jobs={jobs} is invalid: need at least 1 (0 picks one per CPU core, 1 on a GPU)")
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    baseline = BASELINE if BASELINE in labels else labels[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = {
        (spec.label, seed): _run_config(cfg, spec, seed, out / "runs" / _slug(spec.label) / f"seed{seed}")
        for seed in seeds
        for spec in specs
    }
    resolved = {
        "preset": preset,
        "methods": labels,
        "baseline": baseline,
        "seeds": seeds,
        "jobs": jobs,
        "threads": threads,
        "base": config_to_dict(cfg),
        "runs": {f"{label}/seed{seed}": config_to_dict(c) for (label, seed), c in configs.items()},
    }
    write_json(out / "config.json", resolved)
    log(f"laser compare: preset {preset or '(custom)'}, methods {', '.join(labels)}, seeds {seeds}, "
        f"{jobs} job(s) x {threads} thread(s) -> {out}")
    log("resolved config: " + json.dumps(config_to_dict(cfg)))

    start = time.perf_counter()
    runs: dict[tuple[str, int], dict] = {}
    if resume:
        for key, c in configs.items():
            if (done := finished_result(c, Path(c.out_dir))) is not None:
                runs[key] = done
        log(f"resume: {len(runs)} of {len(configs)} run(s) already finished with these settings, reused")
    resolved["reused_runs"] = len(runs)
    todo = {key: c for key, c in configs.items() if key not in runs}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_worker, c, Path(c.out_dir), threads, resume): key for key, c in todo.items()}
        for future in concurrent.futures.as_completed(futures):
            label, seed = futures[future]
            runs[(label, seed)] = r = future.result()
            metric = tasks.get(cfg.task).metric
            score = "solve" if metric is tasks.SOLVE_RATE else metric.key
            log(f"  {label} seed {seed}: {score} {r['final'][metric.key]:.3f} "
                f"(trivial {r[metric.trivial_key]:.3f}), token acc {r['final']['token_acc']:.4f}, "
                f"activations {format_bytes(r['activation_bytes'])}, median step {r['median_step_seconds']:.3f} s "
                f"(CPU {r['median_step_cpu_seconds']:.3f} s)")
    wall = time.perf_counter() - start

    metric = tasks.get(cfg.task).metric
    results = {label: _entry(label, labels, baseline, seeds, runs, metric) for label in labels}
    write_json(out / "results.json", results)
    plots = write_plots(results, out, baseline)
    table = markdown_table(results, baseline)
    (out / "report.md").write_text(
        render_report(results, resolved, table, plots, wall, baseline) + "\n"
    )
    log("\n" + table)
    log(f"\nwall time {wall:.0f} s; report: {out / 'report.md'}")
    return results


def _run_config(cfg: TrainConfig, spec: MethodSpec, seed: int, run_dir: Path) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(with_method(cfg, spec), seed=seed, out_dir=str(run_dir), progress=False)


def step_time(result: dict) -> float:
    """The step time a comparison uses: on a CPU the process CPU time of a step (other processes sharing the
    machine do not inflate it), on a GPU the wall time (the step synchronises)."""
    return result["median_step_seconds"] if result["device"].startswith("cuda") else result["median_step_cpu_seconds"]


def _entry(label: str, labels: list[str], baseline: str, seeds: list[int], runs: dict,
           metric: Metric = tasks.SOLVE_RATE) -> dict:
    """One method's row of results.json, aggregated over seeds; ``p_value`` and ``min_detectable_difference``
    test the task's ``metric`` (the maze solve rate, the text bits per byte)."""
    mine = [runs[(label, s)] for s in seeds]
    base = [runs[(baseline, s)] for s in seeds]
    solve = [r["final"][metric.key] for r in mine]
    acc = [r["final"]["token_acc"] for r in mine]
    is_baseline = label == baseline
    probes = [r["grad_cosine"] for r in mine]
    sites = sorted({site for p in probes if p for site in p[-1]["sites"]})
    return {
        "method": label,
        "name": mine[0]["method"],
        "options": mine[0]["method_options"],
        "baseline": is_baseline,
        "seeds": seeds,
        "activation_bytes": summarize([r["activation_bytes"] for r in mine]),
        "raw_activation_bytes": summarize([r["raw_activation_bytes"] for r in mine]),
        "activation_ratio": summarize([r["activation_bytes"] / b["activation_bytes"] for r, b in zip(mine, base,
                                                                                                      strict=True)]),
        "peak_memory_bytes": summarize([r["peak_memory_bytes"] for r in mine]),
        # None where a run could not reset its peak (or came from before this was measured): never mixed in
        "peak_step_memory_bytes": summarize([r["peak_step_memory_bytes"] for r in mine]
                                            if all(r.get("peak_step_memory_bytes") for r in mine) else []),
        "step_time_ratio": summarize([step_time(r) / step_time(b) for r, b in zip(mine, base, strict=True)]),
        "wall_step_time_ratio": summarize([r["median_step_seconds"] / b["median_step_seconds"]
                                           for r, b in zip(mine, base, strict=True)]),
        "median_step_seconds": summarize([r["median_step_seconds"] for r in mine]),
        "median_step_cpu_seconds": summarize([r["median_step_cpu_seconds"] for r in mine]),
        "token_acc": summarize(acc),
        metric.key: summarize(solve),
        metric.trivial_key: mine[0][metric.trivial_key],
        **({} if metric is tasks.SOLVE_RATE else {"metric": metric.key, "corpus": mine[0].get("corpus")}),
        "p_value": None if is_baseline else welch_p_value(solve, [b["final"][metric.key] for b in base]),
        "p_value_token_acc": None if is_baseline else welch_p_value(acc, [b["final"]["token_acc"] for b in base]),
        "test": None if is_baseline else WELCH_TEST,
        "min_detectable_difference": None if is_baseline else seed_difference(
            solve, [b["final"][metric.key] for b in base]).min_detectable,
        "min_detectable_difference_token_acc": None if is_baseline else seed_difference(
            acc, [b["final"]["token_acc"] for b in base]).min_detectable,
        "gradient_cosine": {
            "model": summarize([p[-1]["model"] for p in probes if p]),
            "curve": [{"step": point["step"], "model": summarize([p[i]["model"] for p in probes])}
                      for i, point in enumerate(probes[0])] if all(len(p) == len(probes[0]) for p in probes) else [],
            "sites": {site: summarize([p[-1]["sites"][site] for p in probes if p and site in p[-1]["sites"]])
                      for site in sites},
        },
        "compression_share": summarize([r["compression_share"] for r in mine]),
        "wall_seconds": summarize([r["wall_seconds"] for r in mine]),
        "steps": mine[0]["steps"],
        "device": mine[0]["device"],
        "precision": mine[0]["precision"],
        "report": mine[0]["report"],
        "curves": {str(s): {"eval": r["curves"]["eval"],
                            "train": [{k: t[k] for k in ("step", "loss", "token_acc", "stored_bytes", "ranks")}
                                      for t in r["curves"]["train"]]}
                   for s, r in zip(seeds, mine, strict=True)},
    }


# ------------------------------------------------------------------------------------------------ report
def _pm(stat: dict, scale: float = 1.0, digits: int = 2, percent: bool = False) -> str:
    factor = 100.0 if percent else scale
    mean, std = stat["mean"] * factor, stat["std"] * factor
    suffix = "%" if percent else ""
    return f"{mean:.{digits}f} ± {std:.{digits}f}{suffix}"


def _show(metric: Metric, stat: dict) -> str:
    """Mean ± std of the headline metric as the reports write it."""
    return _pm(stat, percent=metric.percent, digits=metric.digits)


def markdown_table(results: dict, baseline: str) -> str:
    """The comparison table (markdown): memory, speed, accuracy with mean ± std over seeds, p-values."""
    metric = tasks.metric_of(results)
    if metric is tasks.SOLVE_RATE:
        header = ["method", "peak step memory", "activation memory", "vs baseline", "process peak",
                  "step time (x baseline)", "val token acc", "val solve rate", "p (solve)", "trivial solve",
                  "grad cosine"]
    else:
        header = ["method", "peak step memory", "activation memory", "vs baseline", "process peak",
                  "step time (x baseline)", "val next-byte acc", f"val {metric.name}", f"p ({metric.key})", "unigram",
                  "grad cosine"]
    rows = []
    for label, e in results.items():
        p = e["p_value"]
        cos = e["gradient_cosine"]["model"]
        rows.append([
            label + (" (baseline)" if label == baseline else ""),
            "-" if e["peak_step_memory_bytes"]["mean"] is None else format_bytes(e["peak_step_memory_bytes"]["mean"]),
            format_bytes(e["activation_bytes"]["mean"]),
            f"{e['activation_ratio']['mean']:.3f}",
            format_bytes(e["peak_memory_bytes"]["mean"]),
            _pm(e["step_time_ratio"]),
            _pm(e["token_acc"], percent=True),
            _show(metric, e[metric.key]),
            "-" if p is None else f"{p:.3g}",
            metric.show(e[metric.trivial_key]),
            "-" if cos["mean"] is None else f"{cos['mean']:.4f}",
        ])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _better_or_equal(metric: Metric, a: float, b: float) -> bool:
    return a >= b if metric.higher_is_better else a <= b


def keeps_accuracy(entry: dict, baseline: dict, alpha: float = 0.05) -> bool:
    """Whether a method's headline metric (solve rate, bits per byte) is not significantly worse than the
    baseline's (Welch p >= ``alpha``, or a mean at least as good; with one seed or no variance only the means
    are compared)."""
    metric = tasks.metric_of({"entry": entry})
    if _better_or_equal(metric, entry[metric.key]["mean"], baseline[metric.key]["mean"]):
        return True
    return entry["p_value"] is not None and entry["p_value"] >= alpha


def pareto_front(results: dict) -> list[str]:
    """Methods no other method beats on every axis at once: less activation memory, less step time and a
    better mean headline metric (a higher solve rate, fewer bits per byte; ties count as not worse; a method
    equal on all three is not dominated)."""
    metric = tasks.metric_of(results)
    sign = -1 if metric.higher_is_better else 1
    axes = {label: (e["activation_bytes"]["mean"], e["step_time_ratio"]["mean"], sign * e[metric.key]["mean"])
            for label, e in results.items()}

    def dominates(a: tuple, b: tuple) -> bool:
        return a != b and all(x <= y for x, y in zip(a, b, strict=True))

    return [label for label, mine in axes.items()
            if not any(dominates(other, mine) for other_label, other in axes.items() if other_label != label)]


def _points(x: float) -> str:
    return f"{100 * x:.1f} points"


def _evidence(d: SeedDifference, amount: Callable[[float], str]) -> str:
    """How ``d`` was judged: the difference, the smallest one its seeds could detect, the test and p."""
    signed = ("+" if d.difference > 0 else "") + amount(d.difference)
    if d.min_detectable is None:
        return f"difference {signed}; {d.note}" + ("; every seed agrees, so they are told apart" if d.told_apart
                                                   else "")
    p = f"Welch t-test p = {d.p_value:.3g}"
    if d.told_apart:
        return f"difference {signed}, at least the {amount(d.min_detectable)} the seeds could detect; {p}"
    caveat = (f" < {d.alpha:g}, but a difference this small is detected less than {100 * d.power:.0f}% of the "
              "time at these seeds" if d.significant else "")
    return f"difference {signed}, under the {amount(d.min_detectable)} the seeds could detect; {p}{caveat}"


def _axis_line(title: str, results: dict, baseline: str, stat: Callable[[dict], dict | None], lower: bool,
               show: Callable[[dict], str], amount: Callable[[float], str]) -> str | None:
    """One "who wins" bullet over every method, the baseline included; the best mean is named a winner only
    when its seeds tell it apart from the one it is compared with (the baseline, or the best other method
    when the baseline itself is best)."""
    pool = {label: stat(e) for label, e in results.items()}
    pool = {label: v for label, v in pool.items() if v is not None and v["mean"] is not None}
    if not pool:
        return None
    order = sorted(pool, key=lambda label: ((1 if lower else -1) * pool[label]["mean"], label != baseline))
    best = order[0]

    def named(label: str) -> str:  # the baseline is always introduced as "the baseline" in the line
        return f"**{label}** ({show(results[label])})"

    if baseline not in pool:
        return f"- {title}: {named(best)}; the baseline {baseline} has no value on this axis"
    if best == baseline:
        if len(order) == 1:
            return f"- {title}: the baseline {named(baseline)}; no other method has a value on this axis"
        runner = order[1]
        d = seed_difference(pool[runner]["per_seed"], pool[baseline]["per_seed"])
        if d.told_apart:
            return (f"- {title}: the baseline {named(baseline)}; among the other methods {named(runner)}, "
                    f"behind it: {_evidence(d, amount)}")
        if d.difference == 0:
            return (f"- {title}: a tie: the baseline {named(baseline)} and {named(runner)} have equal means "
                    f"({_evidence(d, amount)}); neither is named the winner")
        return (f"- {title}: the seeds cannot tell the baseline {named(baseline)} from {named(runner)}, the best "
                f"of the other methods ({_evidence(d, amount)}); neither is named the winner")
    d = seed_difference(pool[best]["per_seed"], pool[baseline]["per_seed"])
    if d.told_apart:
        return f"- {title}: {named(best)}, ahead of the baseline {named(baseline)}: {_evidence(d, amount)}"
    return (f"- {title}: the seeds cannot tell {named(best)}, the best mean, from the baseline "
            f"{named(baseline)} ({_evidence(d, amount)}); neither is named the winner")


def axis_winners(results: dict, baseline: str) -> list[str]:
    """Plain-language lines: who wins on which axis, measured, every method and the baseline among the
    candidates (markdown bullets). A best mean is named the winner only when the seeds tell it apart (see
    :func:`laser.analysis.stats.seed_difference`); each line states the difference, the smallest difference
    the seeds could detect and the Welch p-value it was judged by."""
    base = results[baseline]
    if len(results) < 2:
        return []
    metric = tasks.metric_of(results)
    worse = "below" if metric.higher_is_better else "above"
    lines = [_axis_line(
        "least activation memory", results, baseline, lambda e: e["activation_bytes"], lower=True,
        show=lambda e: f"{e['activation_ratio']['mean']:.3f} of the baseline's", amount=format_bytes)]
    keeping = {label: e for label, e in results.items() if label == baseline or keeps_accuracy(e, base)}
    label = min(keeping, key=lambda m: (keeping[m]["activation_bytes"]["mean"], m != baseline))
    if label == baseline:
        lines.append(f"- least activation memory with a {metric.name} not significantly {worse} the baseline's: "
                     f"the baseline **{baseline}** itself: every other method's {metric.name} is significantly "
                     + ("lower" if metric.higher_is_better else "higher"))
    else:
        e = keeping[label]
        d = seed_difference(e[metric.key]["per_seed"], base[metric.key]["per_seed"])
        score = "solve" if metric is tasks.SOLVE_RATE else metric.name
        lines.append(f"- least activation memory with a {metric.name} not significantly {worse} the baseline's "
                     f"(Welch p >= 0.05 or a {'higher' if metric.higher_is_better else 'lower'} mean): **{label}** "
                     f"({e['activation_ratio']['mean']:.3f}, {score} {_show(metric, e[metric.key])} against the "
                     f"baseline's {_show(metric, base[metric.key])}; {_evidence(d, metric.difference)})")
    lines.append(_axis_line(
        "fastest", results, baseline, lambda e: e["step_time_ratio"], lower=True,
        show=lambda e: f"step time {_pm(e['step_time_ratio'])} x the baseline's", amount=lambda x: f"{x:.2f}x"))
    lines.append(_axis_line(
        "most faithful gradients", results, baseline, lambda e: e["gradient_cosine"]["model"], lower=False,
        show=lambda e: f"cosine {e['gradient_cosine']['model']['mean']:.4f}", amount=lambda x: f"{x:.4f}")
        or "- most faithful gradients: no gradient probes in these runs")
    lines.append(_axis_line(
        f"{'highest' if metric.higher_is_better else 'lowest'} {metric.name}", results, baseline,
        lambda e: e[metric.key], lower=not metric.higher_is_better,
        show=lambda e: _show(metric, e[metric.key]), amount=metric.difference))
    lines.append(f"- Pareto front (activation memory, step time, {metric.name}; means, the baseline included): "
                 + ", ".join(f"**{m}**" + (" (baseline)" if m == baseline else "") for m in pareto_front(results)))
    return [line for line in lines if line is not None]


def accuracy_tests(results: dict, baseline: str) -> list[str]:
    """Markdown table: each method's headline-metric (solve rate, bits per byte) and token-accuracy difference
    from the baseline, its test, p-value, the smallest difference its seeds could detect and whether they tell
    the two apart."""
    base = results[baseline]
    headline = tasks.metric_of(results)
    rows = []
    for label, e in results.items():
        if label == baseline:
            continue
        for metric, name in ((headline.key, headline.name), ("token_acc", "token acc")):
            if metric not in e or metric not in base:
                continue
            d = seed_difference(e[metric]["per_seed"], base[metric]["per_seed"])
            if d.told_apart:
                verdict = f"told apart: {'higher' if d.difference > 0 else 'lower'} than the baseline"
            elif d.difference == 0:
                verdict = "equal means"
            elif d.significant:
                verdict = (f"{'higher' if d.difference > 0 else 'lower'} at p < {d.alpha:g}, but under the smallest "
                           "detectable difference: too few seeds to size it")
            else:
                verdict = "the seeds cannot tell them apart"
            if d.note:
                verdict += f" ({d.note})"
            percent = metric == "token_acc" or headline.percent
            shown = f"{100 * d.difference:+.2f} points" if percent else f"{d.difference:+.4f} bits"
            detectable = "-" if d.min_detectable is None else (
                _points(d.min_detectable) if percent else headline.difference(d.min_detectable))
            rows.append(f"| {label} | {name} | {shown} | Welch t-test | "
                        f"{'-' if d.p_value is None else f'{d.p_value:.3g}'} | {detectable} | {verdict} |")
    if not rows:
        return []
    return [f"Difference: the method's mean over seeds minus the baseline's ({baseline}). Test: {WELCH_TEST}, "
            "alpha 0.05. Smallest detectable: the difference that test detects with 80% power at the seeds' "
            "spread, (t(0.975, df) + t(0.8, df)) * sqrt(s1^2/n1 + s2^2/n2) with Welch's df; undefined with one "
            "seed. A difference under it is one these seeds cannot tell from noise.", "",
            "| method | metric | difference | test | p | smallest detectable | verdict |",
            "|---|---|---|---|---|---|---|", *rows]


def gradient_curve_table(results: dict) -> list[str]:
    """Markdown lines: whole-model gradient cosine of every method at each probe point of training."""
    steps = sorted({point["step"] for e in results.values() for point in e["gradient_cosine"]["curve"]})
    if not steps:
        return []
    lines = ["| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for label, e in results.items():
        by_step = {point["step"]: point["model"] for point in e["gradient_cosine"]["curve"]}
        cells = [_pm(by_step[s], digits=4) if s in by_step and by_step[s]["mean"] is not None else "-" for s in steps]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def render_report(results: dict, resolved: dict, table: str, plots: list[str], wall: float, baseline: str) -> str:
    """The whole report.md."""
    first = next(iter(results.values()))
    seeds = first["seeds"]
    tests = accuracy_tests(results, baseline)
    metric = tasks.metric_of(results)
    if metric is tasks.SOLVE_RATE:
        trivial = (f"Trivial solve rate (a model that copies its input grid): {100 * first['trivial_solve_rate']:.1f}% "
                   "of validation mazes.")
        accuracy = ("- val token acc / solve rate: final validation accuracy per cell and whole-grid exact match, "
                    "mean ± std over seeds; p: Welch t-test of the solve rate against the baseline (- for the "
                    "baseline, a single seed, or no variance); the smallest difference the seeds could detect is in "
                    "*Accuracy against the baseline* and results.json (`min_detectable_difference`).")
    else:
        corpus = first.get("corpus") or {}
        trivial = (f"Unigram bits per byte ({metric.trivial_name}): {first[metric.trivial_key]:.4f} on the "
                   f"validation bytes. Corpus: {corpus.get('train_files', '?')} training and "
                   f"{corpus.get('val_files', '?')} validation files of the Python {corpus.get('python', '?')} "
                   f"standard library, content SHA-256 `{corpus.get('content_hash', '?')}` (another Python version "
                   "reads other files: compare only runs with the same hash).")
        accuracy = ("- val next-byte acc / bits per byte: final validation next-byte accuracy and cross-entropy in "
                    "bits per byte (lower is better) over the held-out files' windows, mean ± std over seeds; p: "
                    "Welch t-test of the bits per byte against the baseline (- for the baseline, a single seed, or "
                    "no variance); the smallest difference the seeds could detect is in *Accuracy against the "
                    "baseline* and results.json (`min_detectable_difference`).")
    lines = [
        f"# laser compare: preset {resolved['preset'] or '(custom)'}, {len(seeds)} seed(s) {seeds}",
        "",
        f"Wall time: {wall:.0f} s ({wall / 60:.1f} min), {resolved['jobs']} job(s) x {resolved['threads']} "
        f"thread(s), device {first['device']}, precision {first['precision']}, {first['steps']} optimizer steps "
        "per run" + (f"; {resolved['reused_runs']} run(s) reused from an interrupted invocation (`--resume`), "
                     "not counted in the wall time." if resolved.get("reused_runs") else "."),
        "",
        trivial,
        "",
        table,
        "",
        *(["## Who wins on which axis", "", *axis_winners(results, baseline), ""] if len(results) > 1 else []),
        *(["## Accuracy against the baseline", "", *tests, ""] if tests else []),
        "Method options as run (preset defaults included): "
        + "; ".join(f"{label}: {e['name']} {e['options'] or '(defaults)'}" for label, e in results.items()) + ".",
        "",
        "- activation memory: saved-activation bytes the method kept at the last training step (unique storages "
        "held by the autograd graph, bases included), mean over seeds; *vs baseline* is its ratio to the "
        f"baseline ({baseline}).",
        "- peak step memory: the highest memory during a training step, with the peak reset before each step "
        "(evaluation and the gradient probes excluded); CPU: peak RSS (`VmHWM`, reset through "
        "`/proc/self/clear_refs`; it includes the Python runtime and data), CUDA: `torch.cuda.max_memory_allocated` "
        "(reset with `reset_peak_memory_stats`); `-` where it could not be reset. *process peak*: the same over "
        "the whole run, probes and evaluation included.",
        "- step time: median optimizer-step time divided by the baseline's, same seed, same comparison; on a "
        "CPU the process CPU time of a step (robust to other load on the machine; the wall-time ratio is "
        "`wall_step_time_ratio` in results.json), on a GPU the synchronised wall time.",
        accuracy,
        "- grad cosine: cosine between the method's parameter gradient and the exact one (same weights, method "
        "off) on two fixed validation batches at the end of training, mean over seeds.",
        "- `+checkpoint`: each recursion step (the TRM's `net` call, the looped LM's block stack) is recomputed in "
        "backward (`torch.utils.checkpoint`, non-reentrant), so the graph keeps only each step's inputs and the "
        "tensors outside the recursion. Combined with a method, those inputs are what the method stores (laser "
        "codes the per-step hidden states): backward recomputes every step from the decoded inputs, and the "
        "tensors rebuilt in backward live one step at a time, uncompressed. `+coded-checkpoint` recomputes through "
        "`laser.checkpoint` instead: the method stores the rebuilt tensors too, as it stores them without "
        "checkpointing.",
        "",
        "## Gradient fidelity and compression time",
        "",
        "| method | grad cosine (whole model) | p (token acc) | compression share of step time |",
        "|---|---|---|---|",
    ]
    for label, e in results.items():
        cos, p = e["gradient_cosine"]["model"], e["p_value_token_acc"]
        lines.append(f"| {label} | {'-' if cos['mean'] is None else _pm(cos, digits=4)} | "
                     f"{'-' if p is None else f'{p:.3g}'} | {_pm(e['compression_share'], percent=True, digits=1)} |")
    curve = gradient_curve_table(results)
    if curve:
        lines += ["", "Whole-model gradient cosine against the exact gradient at points of training (same weights, "
                  "same fixed validation batches; mean ± std over seeds; plotted in "
                  "[grad_cosine.png](grad_cosine.png)):", "", *curve]
    for label, e in results.items():
        sites = e["report"]["sites"]
        site_cos = e["gradient_cosine"]["sites"]
        if not any(s["stored_bytes"] < s["raw_bytes"] for s in sites):
            continue
        lines += ["", f"## Sites of {label} (seed {seeds[0]}, last step)", "",
                  "| site | dim | rank | fidelity | raw | stored | saved | grad cosine (only this site) |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in sites:
            cos = site_cos.get(s["name"])
            cos_text = "-" if cos is None else f"{cos['mean']:.4f}"
            lines.append(f"| {s['name']} | {s['dim']} | {s['rank']} | {s['fidelity']:.4f} | "
                         f"{format_bytes(s['raw_bytes'])} | {format_bytes(s['stored_bytes'])} | "
                         f"{100 * s['savings']:.1f}% | {cos_text} |")
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    lines += ["", "## Resolved config", "", "```json", json.dumps(resolved["base"], indent=1), "```",
              "", f"Methods: {', '.join(resolved['methods'])}; seeds {seeds}; per-run configs in config.json."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float, panels: int = 1) -> tuple:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    return fig, axes


def _mean_curve(entry: dict, key: str) -> tuple[list[int], list[float]]:
    curves = [c["eval"] for c in entry["curves"].values()]
    steps = [point["step"] for point in curves[0]]
    usable = [c for c in curves if [point["step"] for point in c] == steps]
    return steps, [statistics.fmean(c[i][key] for c in usable) for i in range(len(steps))]


def write_plots(results: dict, out: Path, baseline: str | None = None) -> list[str]:
    """Validation curves, activation memory, per-site ranks, the two Pareto views and the gradient cosine over
    training (the baseline, by default the entry flagged ``baseline``, marked in the last two), as PNGs in
    ``out``."""
    from laser.analysis.plots import plot_gradient_cosine, plot_pareto

    if baseline is None:
        baseline = next((label for label, e in results.items() if e.get("baseline")), next(iter(results)))
    names = []
    metric = tasks.metric_of(results)
    scale = 100 if metric.percent else 1
    unit = " (%)" if metric.percent else ""
    trivial = next(iter(results.values()))[metric.trivial_key]
    trivial_label = "trivial (copy input)" if metric is tasks.SOLVE_RATE else "unigram (no context)"

    fig, (solve_ax, acc_ax) = _figure(11, 4, 2)
    for label, e in results.items():
        steps, solve = _mean_curve(e, metric.key)
        solve_ax.plot(steps, [scale * v for v in solve], marker="o", label=label)
        steps, acc = _mean_curve(e, "token_acc")
        acc_ax.plot(steps, [100 * v for v in acc], marker="o", label=label)
    solve_ax.axhline(scale * trivial, color="gray", linestyle="--", label=trivial_label)
    solve_ax.set(xlabel="optimizer step", ylabel=f"val {metric.name}{unit}",
                 title=f"Validation {metric.name} (mean of seeds)")
    acc_ax.set(xlabel="optimizer step", ylabel="val token accuracy (%)", title="Validation token accuracy")
    solve_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "val_curves.png")
    names.append("val_curves.png")

    fig, (ax,) = _figure(6, 4)
    labels = list(results)
    mib = [results[m]["activation_bytes"]["mean"] / 2**20 for m in labels]
    err = [results[m]["activation_bytes"]["std"] / 2**20 for m in labels]
    ax.bar(range(len(labels)), mib, yerr=err, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="saved activations (MiB)", title="Activation memory at the last step")
    fig.tight_layout()
    fig.savefig(out / "activation_memory.png")
    names.append("activation_memory.png")

    ranked = [m for m in labels if any(s["rank"] != s["dim"] for s in results[m]["report"]["sites"])]
    fig, axes = _figure(5.5 * max(1, len(ranked)), 4, max(1, len(ranked)))
    for ax, label in zip(axes, ranked, strict=False):
        train = next(iter(results[label]["curves"].values()))["train"]
        sites = sorted({s for t in train for s in t["ranks"]})
        for site in sites:
            points = [(t["step"], t["ranks"][site]) for t in train if site in t["ranks"]]
            if any(r != int(site.rsplit(":", 1)[-1]) for _, r in points):
                ax.plot(*zip(*points, strict=True), label=site)
        ax.set(xlabel="optimizer step", ylabel="rank", title=f"Per-site ranks: {label}")
        ax.legend(fontsize=6)
    if not ranked:
        axes[0].text(0.5, 0.5, "no method projects to a rank below the site width", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out / "ranks.png")
    names.append("ranks.png")

    points = {label: {"memory": e["activation_bytes"]["mean"] / 2**20, "solve": scale * e[metric.key]["mean"],
                      "solve_std": scale * e[metric.key]["std"], "time": e["step_time_ratio"]["mean"],
                      "time_std": e["step_time_ratio"]["std"]} for label, e in results.items()}
    plot_pareto(points, out / "pareto.png", baseline, trivial=scale * trivial,
                metric=f"val {metric.name}{unit}", trivial_label=trivial_label)
    names.append("pareto.png")

    curves = {label: [(point["step"], point["model"]["mean"], point["model"]["std"])
                      for point in e["gradient_cosine"]["curve"] if point["model"]["mean"] is not None]
              for label, e in results.items()}
    plot_gradient_cosine(curves, out / "grad_cosine.png", baseline)
    names.append("grad_cosine.png")
    return names
