"""``laser analyze RUN_DIR``: the paper's analyses of one training run, written as ``analysis.md`` with figures.

A run folder is what ``laser train --out RUN_DIR`` writes: ``checkpoint.pt`` (the final state, required),
``metrics.jsonl`` (LASER's per-site fidelity and rank over training, when the run used LASER) and, when it
was trained with :func:`train_with_snapshots` (``laser analyze RUN_DIR --train PRESET --snapshots N``),
``checkpoints/step-*.pt`` snapshots that give the oracle fidelity over training (Figure 4).

Sections: spectra and effective ranks (3.1), oracle PCA fidelity with 8/16/32-bit codes (Figure 4), PCA
against an autoencoder (3.1), activation statistics and INT8 error (3.2, A.3, A.4), gradient fidelity
(3.5.2), memory against recursion depth (3.4), per-site compression (Table 2), and which claims held.

>>> analyze("runs/quick", out_dir="results/analysis-quick")      # doctest: +SKIP
PosixPath('results/analysis-quick/analysis.md')
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from laser.analysis import plots
from laser.analysis.collect import FIDELITY_BITS, collect_activations, main_sites, site_spectra
from laser.analysis.depth import DEPTHS, depth_scaling
from laser.analysis.gradients import glob_literal, gradient_fidelity, rank_sweep
from laser.analysis.linearity import linearity_check
from laser.analysis.sites import format_site_table, site_table
from laser.analysis.spectra import SUMMARY_RANKS, int8_round_trip, principal_basis, summarize
from laser.analysis.stats import activation_stats, histogram, int8_error, pca_int8_stats
from laser.config import LaserConfig
from laser.report import Report, format_bytes
from laser.subspace import one_thread
from laser.train import tasks
from laser.train.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    parse_method_spec,
    train_preset,
    with_method,
)
from laser.train.trainer import CHECKPOINT_NAME, METRICS_NAME, Trainer, load_checkpoint, resolve_device

REPORT_NAME = "analysis.md"
RESULTS_NAME = "analysis.json"
SNAPSHOT_DIR = "checkpoints"
# Thresholds that decide whether a claim of the paper held on a run (each is stated in the report).
LOW_RANK_FACTOR = 4  # "effective rank << D": the 99%-energy rank is at most D / 4
AUTOENCODER_GAIN = 0.01  # "linear": the autoencoder beats PCA's held-out cosine by less than this
INT8_RELATIVE_MSE = 3e-4  # "< 0.03% of the activation energy"
STATS_CHANGE = 0.02  # PCA + INT8 keeps means and stds "within 2%"
GRADIENT_COSINE = 0.99
ORACLE_RANK, ORACLE_COSINE = 128, 0.975  # Figure 4: rank 128 keeps > 0.975 at the MLP site
LINEAR_R2 = 0.99


@dataclass(frozen=True)
class Settings:
    """How much work the analysis does.

    Attributes:
        batch: examples (mazes, byte windows) per analysis batch (capped by the run's batch and validation set).
        max_rows: rows sampled per site for spectra, statistics and the autoencoder.
        autoencoder_steps: Adam steps of the linearity check's autoencoder.
        grad_batches: batches the gradients are summed over.
        sweep_ranks: ranks of the gradient-against-reconstruction-error sweep at each main site.
        depths: recursion depths of the memory scaling.
        depth_batch: examples in the memory-scaling batch.
    """

    batch: int
    max_rows: int
    autoencoder_steps: int
    grad_batches: int
    sweep_ranks: tuple[int, ...]
    depths: tuple[int, ...]
    depth_batch: int


FULL = Settings(batch=64, max_rows=8192, autoencoder_steps=1000, grad_batches=2,
                sweep_ranks=(2, 4, 8, 16, 32, 64, 128, 256), depths=DEPTHS, depth_batch=16)
QUICK = Settings(batch=16, max_rows=1024, autoencoder_steps=100, grad_batches=1,
                 sweep_ranks=(2, 8, 32), depths=(2, 4, 8), depth_batch=4)


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class Run:
    """A training run read back: its config, model weights per saved step (final last) and metrics lines."""

    path: Path
    config: TrainConfig
    method_state: dict
    weights: dict[int, dict[str, Tensor]]
    metrics: list[dict]
    history: dict

    @property
    def final_step(self) -> int:
        """Step of the final checkpoint."""
        return max(self.weights)


def load_run(run_dir: str | Path) -> Run:
    """Read ``RUN_DIR/checkpoint.pt``, any ``RUN_DIR/checkpoints/*.pt`` snapshots and ``metrics.jsonl``."""
    path = Path(run_dir)
    final_path = path / CHECKPOINT_NAME
    if not final_path.is_file():
        raise FileNotFoundError(
            f"{path} holds no checkpoint: expected {final_path}, which `laser train --out {path}` writes "
            "(or pass --train PRESET to train one there first)"
        )
    final = load_checkpoint(final_path)
    weights = {final["step"]: final["model"]}
    for snapshot in sorted((path / SNAPSHOT_DIR).glob("*.pt")):
        state = load_checkpoint(snapshot)
        weights.setdefault(state["step"], state["model"])
    metrics_path = path / METRICS_NAME
    lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    return Run(path, config_from_dict(final["config"]), final["method"], dict(sorted(weights.items())),
               [json.loads(line) for line in lines if line.strip()], final.get("history", {}))


def build_model(cfg: TrainConfig, weights: dict[str, Tensor], device: torch.device, **changes: object) -> nn.Module:
    """The run's model (a TRM or a looped LM, its model config with ``changes``) holding ``weights``, in fp32 on
    ``device``."""
    model_cfg = dataclasses.replace(cfg.model, forward_dtype="float32", checkpoint=False, **changes)
    model = tasks.get(cfg.task).build_model(model_cfg)
    model.load_state_dict(weights)
    return model.to(device)


# The maze trainer's loss of one batch: ``n_sup - 1`` supervision steps without grad, the last one with it.
supervision_loss = tasks.TASKS["maze"].loss


def task_loss(cfg: TrainConfig) -> Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]:
    """The training loss of one batch of the run's task (:func:`supervision_loss` on mazes)."""
    return tasks.get(cfg.task).loss


def validation_data(cfg: TrainConfig, device: torch.device) -> tasks.TaskData:
    """The run's task data: validation tensors on ``device`` and the trivial score (mazes from the cache when
    present, the text corpus from its files or cache)."""
    return tasks.get(cfg.task).load(cfg, device)


def validation_batches(cfg: TrainConfig, batch: int, device: torch.device,
                       data: tasks.TaskData | None = None) -> list[tuple[Tensor, Tensor]]:
    """The run's validation examples (mazes, byte windows) in consecutive batches of ``batch`` (the last partial
    one dropped)."""
    data = data if data is not None else validation_data(cfg, device)
    inputs, targets = data.val_inputs, data.val_targets
    return [(inputs[i : i + batch], targets[i : i + batch]) for i in range(0, len(inputs) - batch + 1, batch)]


def laser_options(cfg: TrainConfig) -> dict:
    """LASER options of the analyses: the run's own when it trained with LASER, else LASER's defaults."""
    return dict(cfg.method_options) if cfg.method == "laser" else {}


# ------------------------------------------------------------------------------------------------ sections
def _spectra_section(run: Run, settings: Settings, device: torch.device, batches: list,
                     out: Path) -> tuple[dict, dict[str, Tensor]]:
    """Spectra, per-step effective ranks, oracle fidelity (final and over snapshots); also the main sites'
    recorded rows at the final checkpoint."""
    model = build_model(run.config, run.weights[run.final_step], device)
    loss_fn = task_loss(run.config)
    activations = collect_activations(model, batches, loss_fn, max_rows=settings.max_rows)
    mains = main_sites(activations)
    spectra = site_spectra(activations)
    # Per-step samples of the main sites only: for every site they would hold steps x max_rows rows each.
    _, steps = collect_activations(model, batches, loss_fn, max_rows=settings.max_rows, per_step=True,
                                   include=tuple(glob_literal(site) for site in mains.values()))
    plots.plot_spectra({f"{kind}: {site}": spectra[site].summary for kind, site in mains.items()},
                       out / "spectra.png")
    per_step = {
        site: {step: summarize(rows).effective_ranks[0.99] for step, rows in steps[site].items() if min(rows.shape) > 1}
        for site in mains.values()
    }
    plots.plot_xy({site: (list(r), list(r.values())) for site, r in per_step.items()}, out / "rank-per-step.png",
                  "recursion step (with grad)", "effective rank at 99% energy", "effective rank per recursion step")
    over_training = {site: {} for site in mains.values()}
    for step, weights in run.weights.items():
        if step == run.final_step:
            fidelity = {site: spectra[site].fidelity for site in mains.values()}
        else:
            snapshot = collect_activations(build_model(run.config, weights, device), batches, loss_fn,
                                           max_rows=settings.max_rows,
                                           include=tuple(glob_literal(site) for site in mains.values()))
            fidelity = {site: s.fidelity for site, s in site_spectra(snapshot, mains.values()).items()}
        for site in mains.values():
            over_training[site][step] = fidelity[site]
    for kind, site in mains.items():
        curves = {
            f"k={k}, {b}-bit": [(step, values[(k, b)]) for step, values in over_training[site].items()]
            for (k, b) in spectra[site].fidelity
        }
        if curves:
            plots.plot_fidelity_over_training(curves, out / f"oracle-fidelity-{kind}.png",
                                              f"oracle PCA fidelity at {site}")
    return {
        "main_sites": mains,
        "sites": {
            site: {"dim": s.summary.dim, "rows": s.summary.n_rows,
                   "effective_ranks": {str(e): k for e, k in s.summary.effective_ranks.items()},
                   "energy_at_rank": {str(k): e for k, e in s.summary.energy_at_rank.items()}}
            for site, s in spectra.items()
        },
        "rank_per_step": {site: {str(k): v for k, v in r.items()} for site, r in per_step.items()},
        "oracle_fidelity": {
            site: {str(step): {f"{k}/{b}": v for (k, b), v in values.items()} for step, values in curves.items()}
            for site, curves in over_training.items()
        },
        "snapshots": sorted(run.weights),
    }, {site: activations[site] for site in mains.values()}


def _laser_over_training(run: Run, mains: dict[str, str], out: Path) -> dict:
    """LASER's own per-site fidelity and rank from the run's metrics (only when it trained with LASER)."""
    lines = [m for m in run.metrics if "sites" in m and "step" in m]
    if run.config.method != "laser" or not lines:
        return {}
    curves = {site: [(m["step"], m["sites"][site]["fidelity"]) for m in lines if site in m["sites"]]
              for site in mains.values()}
    ranks = {site: [(m["step"], m["sites"][site]["rank"]) for m in lines if site in m["sites"]]
             for site in mains.values()}
    curves, ranks = {s: c for s, c in curves.items() if c}, {s: r for s, r in ranks.items() if r}
    if not curves:
        return {}
    threshold = laser_options(run.config).get("threshold", LaserConfig().threshold)
    plots.plot_fidelity_over_training(curves, out / "laser-fidelity.png", "LASER fidelity ||Z||/||X|| in training",
                                      threshold=threshold)
    plots.plot_xy({s: ([p for p, _ in r], [k for _, k in r]) for s, r in ranks.items()}, out / "laser-rank.png",
                  "training step", "rank", "LASER rank in training")
    return {"fidelity": curves, "rank": ranks, "threshold": threshold}


def _linearity_section(activations: dict[str, Tensor], mains: dict[str, str], settings: Settings) -> dict:
    """PCA against an autoencoder at each main site, at the ranks holding 95% and 99% of the energy."""
    results = {}
    for site in mains.values():
        x = activations[site]
        train_rows = x.shape[0] - max(1, round(x.shape[0] * 0.2))
        ranks = summarize(x).effective_ranks
        results[site] = [
            dataclasses.asdict(linearity_check(x, min(ranks[energy], train_rows, x.shape[1]),
                                               steps=settings.autoencoder_steps)) | {"energy": energy}
            for energy in (0.95, 0.99)
        ]
    return results


def _stats_section(activations: dict[str, Tensor], mains: dict[str, str], out: Path) -> dict:
    """Distribution statistics, INT8 error, PCA + INT8 statistics and histograms at each main site."""
    results = {}
    for kind, site in mains.items():
        x = activations[site]
        d = x.shape[1]
        ranks = [k for k in (64, 128, 256) if k < d] or [max(1, d // 4), max(1, d // 2)]
        pca_rows = pca_int8_stats(x, ranks)
        results[site] = {"stats": dataclasses.asdict(activation_stats(x)), "int8": int8_error(x),
                         "pca_int8": pca_rows}
        k = min(ranks)
        basis = principal_basis(x, min(k, min(x.shape)))  # (D, k)
        codes = x.double() @ basis  # (N, k)
        x_hat = int8_round_trip(codes, codes.abs().amax(dim=0) / 127) @ basis.T  # (N, D)
        raw_counts, edges = histogram(x)
        hat_counts = torch.histc(x_hat, bins=len(raw_counts), min=float(edges[0]), max=float(edges[-1]))  # same bins
        plots.plot_histograms({f"raw {site}": (raw_counts, edges), f"rank {k} + INT8": (hat_counts.numpy(), edges)},
                              out / f"histogram-{kind}.png")
    return results


def _gradient_section(run: Run, settings: Settings, device: torch.device, batches: list, mains: dict[str, str],
                      out: Path) -> tuple[dict, Report]:
    """Gradient fidelity per site and for the whole model, and the rank sweep at each main site; also LASER's
    report of the whole-model step."""
    model = build_model(run.config, run.weights[run.final_step], device)
    options = laser_options(run.config)
    measured = batches[: settings.grad_batches]
    warmup_batches = batches[settings.grad_batches : 2 * settings.grad_batches] or measured
    state = run.method_state if run.config.method == "laser" else None
    loss_fn = task_loss(run.config)
    result = gradient_fidelity(model, measured, loss_fn, warmup_batches=warmup_batches, state=state,
                               **options)
    if result.sites:
        plots.plot_scatter({row.site: (row.relative_error, 1 - row.cosine) for row in result.sites},
                           out / "gradient-sites.png", "relative reconstruction error ||X - X_hat|| / ||X||",
                           "1 - gradient cosine", "gradient fidelity, one site compressed at a time")
    sweep_options = {k: v for k, v in options.items() if k not in ("rank", "max_rank", "policy")}
    sweeps = {}
    for site in mains.values():
        ranks = [k for k in settings.sweep_ranks if k < int(site.rsplit(":", 1)[1])]
        if ranks:
            sweeps[site] = rank_sweep(model, measured, loss_fn, site, ranks, warmup_batches=warmup_batches,
                                      policy="paper", **sweep_options)
    if sweeps:
        series = {site: ([r.relative_error for r in rows], [max(r.relative_grad_error, 1e-12) for r in rows])
                  for site, rows in sweeps.items()}
        plots.plot_xy(series, out / "gradient-vs-error.png", "relative reconstruction error ||X - X_hat|| / ||X||",
                      "relative gradient error ||g~ - g|| / ||g||", "Theorem 1: gradient error against reconstruction",
                      logx=True, logy=True)
    return {
        "source": "the run's trained LASER state" if state is not None else "a fresh LASER warmed up for 2 steps",
        "options": options,
        "model_cosine": result.model_cosine,
        "model_relative_error": result.model_relative_error,
        "model_relative_grad_error": result.model_relative_grad_error,
        "sites": [dataclasses.asdict(row) for row in result.sites],
        "sweeps": {site: [dataclasses.asdict(r) for r in rows] for site, rows in sweeps.items()},
        "probes": run.history.get("grad_cosine", []),
    }, result.report


def _depth_section(run: Run, settings: Settings, device: torch.device, batch: tuple, out: Path) -> dict:
    """Saved-activation bytes against recursion depth for baseline and LASER."""
    weights = run.weights[run.final_step]
    size = settings.depth_batch
    batch = (batch[0][:size], batch[1][:size])

    task = tasks.get(run.config.task)

    def model_at_depth(n: int) -> nn.Module:
        return build_model(run.config, weights, device, **task.depth(n))

    state = run.method_state if run.config.method == "laser" else None
    result = depth_scaling(model_at_depth, batch, task.loss, settings.depths, state=state,
                           **laser_options(run.config))
    depths = [p.depth for p in result.points]
    mib = 2.0**20
    plots.plot_xy(
        {
            "baseline (measured)": (depths, [p.baseline_bytes / mib for p in result.points]),
            "baseline O(nBD)": (depths, [b / mib for b in result.predicted_baseline]),
            "LASER (measured)": (depths, [p.laser_bytes / mib for p in result.points]),
            "LASER O(nBk + Dk)": (depths, [b / mib for b in result.predicted_laser]),
        },
        out / "depth.png", f"recursion depth n ({next(iter(task.depth(1)))})", "saved activations (MiB)",
        f"memory against depth (batch {batch[0].shape[0]})",
    )
    return {
        "batch": batch[0].shape[0],
        "source": "the run's trained LASER state" if state is not None else "a fresh LASER warmed up for 2 steps",
        "points": [dataclasses.asdict(p) for p in result.points],
        "predicted_baseline": result.predicted_baseline,
        "predicted_laser": result.predicted_laser,
        "baseline_fit": dataclasses.asdict(result.baseline_fit),
        "laser_fit": dataclasses.asdict(result.laser_fit),
        "slope_ratio": result.slope_ratio,
    }


# -------------------------------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Claim:
    """One claim of the paper checked on this run: ``held`` is None where it could not be measured."""

    claim: str
    held: bool | None
    evidence: str


def check_claims(results: dict) -> list[Claim]:
    """Decide each of the paper's claims from the measured numbers, with the criterion used."""
    mains = results["spectra"]["main_sites"]
    sites = results["spectra"]["sites"]
    claims = []
    mlp = mains.get("mlp")
    if mlp is None:
        claims.append(Claim("Low-rank MLP site", None, "no MLP site was recorded"))
    else:
        r99, dim = sites[mlp]["effective_ranks"]["0.99"], sites[mlp]["dim"]
        hidden = results.get("run", {}).get("hidden")
        caveat = (f"; a linear image of the block input has rank at most the hidden width {hidden}, which "
                  f"{r99} is {hidden / r99:.1f}x below" if hidden and hidden < dim else "")
        claims.append(Claim(
            "Low-rank MLP site (3.1): effective rank at 99% energy << D",
            r99 * LOW_RANK_FACTOR <= dim,
            f"`{mlp}`: {r99} of D={dim} ({dim / r99:.1f}x smaller; criterion: at most D/{LOW_RANK_FACTOR}){caveat}",
        ))
        oracle = results["spectra"]["oracle_fidelity"][mlp]
        final = oracle[str(max(int(s) for s in oracle))]
        low = [min(v[f"{ORACLE_RANK}/{b}"] for v in oracle.values()) for b in FIDELITY_BITS
               if f"{ORACLE_RANK}/{b}" in final]
        if low:
            exact = (f"; the model is only {hidden} wide and this site a linear image of a {hidden}-wide input, so "
                     f"rank {ORACLE_RANK} is exact by construction" if hidden and hidden <= ORACLE_RANK else "")
            claims.append(Claim(
                f"Oracle fidelity at rank {ORACLE_RANK} stays > {ORACLE_COSINE} at the MLP site (Figure 4)",
                min(low) > ORACLE_COSINE,
                f"lowest cosine over {len(oracle)} checkpoint(s) and 8/16/32-bit codes: {min(low):.4f}{exact}",
            ))
        else:
            claims.append(Claim(f"Oracle fidelity at rank {ORACLE_RANK} (Figure 4)", None,
                                f"`{mlp}` is not wider than {ORACLE_RANK}, so rank {ORACLE_RANK} does not compress it"))
    gains = [(site, r["rank"], r["gain"]) for site, rows in results["linearity"].items() for r in rows]
    claims.append(Claim(
        "Linear structure (3.1): an autoencoder does not beat PCA",
        max(g for _, _, g in gains) < AUTOENCODER_GAIN if gains else None,
        "; ".join(f"`{s}` rank {k}: gain {g:+.4f}" for s, k, g in gains)
        + f" (held-out cosine, autoencoder minus PCA; criterion: gain < {AUTOENCODER_GAIN} at every rank)",
    ))
    int8 = {site: max(r["int8"]["relative_mse_max"], r["int8"]["relative_mse_sigma"])
            for site, r in results["stats"].items()}
    claims.append(Claim(
        "INT8 (3.2): relative MSE < 0.03% with max and 4-sigma scaling",
        max(int8.values()) < INT8_RELATIVE_MSE if int8 else None,
        "; ".join(f"`{s}`: worst {100 * e:.4f}%" for s, e in int8.items()),
    ))
    changes = {site: max(max(row["mean_shift"], row["std_change"]) for row in r["pca_int8"])
               for site, r in results["stats"].items() if r["pca_int8"]}
    claims.append(Claim(
        "PCA + INT8 keeps means and standard deviations within 2% (A.3)",
        max(changes.values()) < STATS_CHANGE if changes else None,
        "; ".join(f"`{s}`: largest change {100 * c:.3f}% of the std" for s, c in changes.items()),
    ))
    grad = results["gradients"]
    worst = min((row["cosine"] for row in grad["sites"]), default=None)
    claims.append(Claim(
        f"Faithful gradients (3.5.2): gradient cosine > {GRADIENT_COSINE}",
        grad["model_cosine"] > GRADIENT_COSINE,
        f"whole model {grad['model_cosine']:.5f} at reconstruction error {grad['model_relative_error']:.4f}"
        + (f"; worst single site {worst:.5f}" if worst is not None else ""),
    ))
    depth = results["depth"]
    linear = depth["baseline_fit"]["r2"] > LINEAR_R2 and depth["laser_fit"]["r2"] > LINEAR_R2
    claims.append(Claim(
        "Memory grows linearly with depth and LASER's slope is smaller (3.4)",
        linear and depth["slope_ratio"] < 1,
        f"baseline {format_bytes(depth['baseline_fit']['slope'])}/step (R^2 {depth['baseline_fit']['r2']:.4f}), "
        f"LASER {format_bytes(depth['laser_fit']['slope'])}/step (R^2 {depth['laser_fit']['r2']:.4f}): "
        f"slope ratio {depth['slope_ratio']:.3f}",
    ))
    return claims


# -------------------------------------------------------------------------------------------------- report
def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}"


def _ratio(numerator: float, denominator: float) -> str:
    # Below 1e-6 the reconstruction is exact up to rounding and the ratio is noise.
    return f"{numerator / denominator:.2f}" if denominator > 1e-6 else "-"


def write_report(results: dict, claims: list[Claim], out: Path) -> Path:
    """Write ``analysis.md`` into ``out`` from the results of :func:`analyze` (figures already there)."""
    run, spectra = results["run"], results["spectra"]
    mains = spectra["main_sites"]
    lines = [f"# Analysis of `{run['path']}`", ""]
    lines += [
        f"Model: {run['model']}; trained with `{run['method']}` "
        f"({run['method_options'] or 'default options'}) for "
        f"{run['step']} steps. Final validation: {run['final']}; {run['trivial']}.",
        f"Analysis batches: {run['batches']} x {run['batch']} validation {run['examples']}; up to "
        f"{run['max_rows']} rows per site; settings `{run['settings']}`; {results['seconds']:.0f} s.",
        "",
        "## Claims of the paper on this run",
        "",
    ]
    verdict = {True: "held", False: "did not hold", None: "not measured"}
    lines += [f"- **{verdict[c.held]}**: {c.claim}. {c.evidence}." for c in claims]
    lines += ["", "## Spectra (section 3.1)", "",
              f"Main sites (the widest MLP and attention sites): {', '.join(f'{k} `{s}`' for k, s in mains.items())}.",
              "Effective rank: smallest k whose top-k singular values hold that share of the energy (uncentered, "
              "like LASER's codes). Rows pool batch, positions and recursion steps.", ""]
    header = ["site", "D", "rows", "rank @95%", "rank @99%"] + [f"energy @k={k}" for k in SUMMARY_RANKS]
    rows = [[f"`{site}`", s["dim"], s["rows"], s["effective_ranks"]["0.95"], s["effective_ranks"]["0.99"]]
            + [_fmt(s["energy_at_rank"][str(k)]) if str(k) in s["energy_at_rank"] else "-" for k in SUMMARY_RANKS]
            for site, s in spectra["sites"].items()]
    lines += _table(header, rows)
    lines += ["![spectra](spectra.png)", "",
              "Effective rank at 99% energy of each recursion step's activations (steps with grad):", "",
              "![rank per step](rank-per-step.png)", ""]
    lines += ["## Oracle PCA fidelity (Figure 4)", "",
              "Cosine between the activations and their rank-k reconstruction with the SVD basis recomputed "
              "exactly for the batch, codes stored in 8 (per-column absmax INT8), 16 (bf16) or 32 bits. "
              "Ranks not below D are left out.", ""]
    snapshots = spectra["snapshots"]
    if len(snapshots) > 1:
        lines += [f"Measured at {len(snapshots)} checkpoints (steps {', '.join(map(str, snapshots))}).", ""]
    else:
        lines += [f"The run directory holds only the final checkpoint (step {snapshots[0]}), so this is the final "
                  "model only; train with `--snapshots N` for curves over training.", ""]
    for kind, site in mains.items():
        final = spectra["oracle_fidelity"][site][str(snapshots[-1])]
        if not final:
            continue
        ranks = sorted({int(key.split("/")[0]) for key in final})
        lines += [f"`{site}` at step {snapshots[-1]}:", ""]
        lines += _table(["rank"] + [f"{b}-bit" for b in FIDELITY_BITS],
                        [[k] + [_fmt(final[f"{k}/{b}"], 5) for b in FIDELITY_BITS] for k in ranks])
        lines += [f"![oracle fidelity {kind}](oracle-fidelity-{kind}.png)", ""]
    laser = results["laser_training"]
    if laser:
        lines += ["LASER's own fidelity ||Z||/||X|| and rank during training (from `metrics.jsonl`):", "",
                  "![laser fidelity](laser-fidelity.png) ![laser rank](laser-rank.png)", ""]
    lines += ["## Linearity: PCA against an autoencoder (section 3.1)", "",
              "Held-out reconstruction cosine of rank-k PCA (centered) and of a SiLU autoencoder with a k-wide "
              "bottleneck, k = the ranks holding 95% and 99% of the energy. A clearly positive gain would mean a "
              "curved manifold.", ""]
    lines += _table(["site", "energy", "rank", "PCA cosine", "autoencoder cosine", "gain", "train/test rows"],
                    [[f"`{s}`", f"{r['energy']:.0%}", r["rank"], _fmt(r["pca_cosine"], 5),
                      _fmt(r["autoencoder_cosine"], 5), f"{r['gain']:+.5f}", f"{r['train_rows']}/{r['test_rows']}"]
                     for s, rows in results["linearity"].items() for r in rows])
    lines += ["## Activation statistics and INT8 (section 3.2, A.3, A.4)", ""]
    rows = []
    for s, r in results["stats"].items():
        st, q = r["stats"], r["int8"]
        rows.append([f"`{s}`", _fmt(st["mean"]), _fmt(st["std"]),
                     f"[{st['channel_std_min']:.3f}, {st['channel_std_max']:.3f}]",
                     " / ".join(f"{st['outlier_rates'][k]:.1e}" for k in (2.0, 3.0, 4.0, 5.0)),
                     _fmt(st["excess_kurtosis"], 2), f"{q['relative_mse_max']:.2e}", f"{q['relative_mse_sigma']:.2e}",
                     f"{q['clip_rate_sigma']:.1e}"])
    lines += _table(["site", "mean", "std", "channel std range", "P(>2/3/4/5 std)", "excess kurtosis",
                     "INT8 rel. MSE (max)", "INT8 rel. MSE (4 std)", "clipped (4 std)"], rows)
    lines += ["Gaussian tail rates for comparison: 4.6e-02 / 2.7e-03 / 6.3e-05 / 5.7e-07.", "",
              "Rank-k PCA with per-column INT8 codes: change of mean (in stds) and of std, relative MSE with and "
              "without INT8:", ""]
    rows = [[f"`{s}`", row["rank"], f"{100 * row['mean_shift']:.3f}%", f"{100 * row['std_change']:.3f}%",
             f"{row['relative_mse']:.2e}", f"{row['relative_mse_projection']:.2e}"]
            for s, r in results["stats"].items() for row in r["pca_int8"]]
    lines += _table(["site", "rank", "mean shift", "std change", "rel. MSE (PCA+INT8)", "rel. MSE (PCA)"], rows)
    lines += [f"![histogram {kind}](histogram-{kind}.png)" for kind in mains] + [""]
    grad = results["gradients"]
    lines += ["## Gradient fidelity (section 3.5.2, Theorem 1)", "",
              f"Parameter-gradient cosine between exact backward and backward through LASER's reconstructions "
              f"(LASER options {grad['options'] or 'default'}; starting from {grad['source']}), summed over "
              f"{run['grad_batches']} batch(es). Reconstruction error: ||X - X_hat|| / ||X|| of what backward saw.",
              "",
              f"Whole model: cosine **{grad['model_cosine']:.6f}**, relative gradient error "
              f"{grad['model_relative_grad_error']:.2e}, reconstruction error {grad['model_relative_error']:.4f}.",
              ""]
    lines += _table(["site (only it compressed)", "D", "rank", "LASER fidelity", "reconstruction error",
                     "gradient cosine", "relative gradient error"],
                    [[f"`{r['site']}`", r["dim"], r["rank"], _fmt(r["fidelity"], 5), _fmt(r["relative_error"], 5),
                      _fmt(r["cosine"], 6), f"{r['relative_grad_error']:.2e}"] for r in grad["sites"]])
    if grad["sites"]:
        lines += ["![gradient per site](gradient-sites.png)", ""]
    if grad["sweeps"]:
        lines += ["Rank sweep with only the main site compressed (policy `paper`, so every tensor is stored as "
                  "codes): Theorem 1 predicts a gradient error at most proportional to the reconstruction error.", ""]
        lines += _table(["site", "rank", "reconstruction error", "gradient cosine", "relative gradient error",
                         "gradient error / reconstruction error"],
                        [[f"`{s}`", r["rank"], _fmt(r["relative_error"], 5), _fmt(r["cosine"], 6),
                          f"{r['relative_grad_error']:.2e}",
                          _ratio(r["relative_grad_error"], r["relative_error"])]
                         for s, rows in grad["sweeps"].items() for r in rows])
        lines += ["![gradient against reconstruction error](gradient-vs-error.png)", ""]
    if grad["probes"]:
        lines += ["Gradient probes the trainer logged during training (whole model):", ""]
        lines += _table(["step", "cosine", "worst site"],
                        [[p["step"], _fmt(p["model"], 6),
                          _fmt(min(p["sites"].values()), 6) if p.get("sites") else "-"] for p in grad["probes"]])
    depth = results["depth"]
    lines += ["## Memory against recursion depth (section 3.4)", "",
              f"Saved-activation bytes (unique storages kept by autograd, from each method's report) of one "
              f"forward + backward of the final model unrolled {run['depth_words']}, "
              f"batch {depth['batch']}; LASER from {depth['source']}. Predictions take their constants from the "
              f"smallest depth: M_full(n) = M_full(n0) n / n0 and M_LASER(n) = (M_LASER(n0) - bases) n / n0 + "
              f"bases, bases = sum of D k 4 B over compressed sites. Both forms also scale what is saved once per "
              f"forward (embedding, head, loss), so they overshoot at larger n by (n / n0 - 1) times those bytes; "
              f"the least-squares lines below separate the per-step bytes (slope) from them (intercept).", ""]
    lines += _table(
        ["n", "baseline", "O(nBD)", "LASER", "O(nBk + Dk)", "LASER bases", "savings"],
        [[p["depth"], format_bytes(p["baseline_bytes"]), format_bytes(fb), format_bytes(p["laser_bytes"]),
          format_bytes(fl), format_bytes(p["laser_basis_bytes"]),
          f"{100 * (1 - p['laser_bytes'] / p['baseline_bytes']):.1f}%"]
         for p, fb, fl in zip(depth["points"], depth["predicted_baseline"], depth["predicted_laser"], strict=True)])
    bf, lf = depth["baseline_fit"], depth["laser_fit"]
    lines += [f"Least-squares lines: baseline {format_bytes(bf['intercept'])} + {format_bytes(bf['slope'])} x n "
              f"(R^2 {bf['r2']:.5f}); LASER {format_bytes(lf['intercept'])} + {format_bytes(lf['slope'])} x n "
              f"(R^2 {lf['r2']:.5f}); LASER's bytes per step are {depth['slope_ratio']:.3f} of the baseline's.", "",
              "![depth](depth.png)", ""]
    lines += ["## Per-site compression (Table 2)", "",
              f"LASER's report for one step over the gradient batches ({grad['source']}).", ""]
    lines += [results["site_table"], ""]
    path = out / REPORT_NAME
    path.write_text("\n".join(lines))
    return path


def analyze(run_dir: str | Path, out_dir: str | Path | None = None, max_batches: int = 4, quick: bool = False,
            device: str = "auto", progress: Callable[[str], None] | None = None) -> Path:
    """Run every analysis on the run in ``run_dir`` and write ``analysis.md``, ``analysis.json`` and PNG figures.

    ``out_dir`` defaults to ``RUN_DIR/analysis``. Activations are recorded over ``max_batches`` validation
    batches; ``quick`` does less of everything (see :data:`QUICK`). ``progress`` receives a line per section.
    Returns the path of ``analysis.md``. Raises FileNotFoundError naming ``RUN_DIR/checkpoint.pt`` when the
    run has no checkpoint.
    """
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
    start = time.perf_counter()
    say = progress or (lambda line: None)
    settings = QUICK if quick else FULL
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    cfg = run.config
    task = tasks.get(cfg.task)
    data = validation_data(cfg, dev)
    batch = min(settings.batch, cfg.batch, len(data.val_inputs))
    batches = validation_batches(cfg, batch, dev, data)
    needed = max(max_batches, 2 * settings.grad_batches)
    if len(batches) < needed:
        say(f"only {len(batches)} validation batches of {batch}; the analyses share them")
    batches = batches[:needed]

    # The decompositions here are small: threaded LAPACK only spin-waits on them (see subspace.one_thread).
    with one_thread():
        say("spectra and oracle fidelity")
        spectra, activations = _spectra_section(run, settings, dev, batches[:max_batches], out)
        mains = spectra["main_sites"]
        laser_training = _laser_over_training(run, mains, out)
        say("linearity (autoencoder)")
        linearity = _linearity_section(activations, mains, settings)
        say("activation statistics and INT8")
        stats = _stats_section(activations, mains, out)
    say("gradient fidelity")
    gradients, report = _gradient_section(run, settings, dev, batches, mains, out)
    say("memory against depth")
    depth = _depth_section(run, settings, dev, batches[0], out)
    try:
        table = format_site_table(site_table(report))
    except ValueError as err:
        table = f"LASER saved nothing here: {err}."
    final_eval = next((e for e in reversed(run.history.get("eval", [])) if e.get("final")), None)
    results = {
        "run": {
            "path": str(run.path), "task": cfg.task, "method": cfg.method, "method_options": cfg.method_options,
            "step": run.final_step, "hidden": cfg.model.hidden, "model": task.describe_model(cfg.model),
            **{key: getattr(cfg.model, key) for key in ("L_cycles", "H_cycles", "n_sup", "layers", "loops")
               if hasattr(cfg.model, key)},
            "final": task.final_words(final_eval) if final_eval else "not recorded",
            "final_metrics": final_eval,
            **data.summary,
            "trivial": task.trivial_words(data.summary),
            "examples": task.examples,
            "depth_words": task.depth_words,
            "batch": batch, "batches": min(max_batches, len(batches)), "grad_batches": settings.grad_batches,
            "max_rows": settings.max_rows, "settings": "quick" if quick else "full",
        },
        "spectra": spectra,
        "laser_training": laser_training,
        "linearity": linearity,
        "stats": stats,
        "gradients": gradients,
        "depth": depth,
        "site_table": table,
    }
    claims = check_claims(results)
    results["claims"] = [dataclasses.asdict(c) for c in claims]
    results["seconds"] = time.perf_counter() - start
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    return write_report(results, claims, out)


def _jsonable(value: object) -> object:
    if isinstance(value, Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ------------------------------------------------------------------------------------------------ training
def train_with_snapshots(cfg: TrainConfig, snapshots: int) -> Path:
    """Train ``cfg`` into ``cfg.out_dir`` as ``laser train`` does, also saving ``snapshots`` evenly spaced
    checkpoints (and one at step 0) as ``OUT/checkpoints/step-NNNNNN.pt`` for the analyses over training."""
    if cfg.out_dir is None:
        raise ValueError("out_dir is None: set it to the run folder the snapshots go to")
    if isinstance(snapshots, bool) or not isinstance(snapshots, int) or snapshots < 1:
        raise ValueError(f"snapshots must be a positive int, got {snapshots!r}")
    trainer = Trainer(cfg)
    folder = Path(cfg.out_dir) / SNAPSHOT_DIR
    trainer.save(folder / f"step-{0:06d}.pt")
    stops = sorted({max(1, round(trainer.total_steps * i / snapshots)) for i in range(1, snapshots + 1)})
    for stop in stops:
        trainer.train(until=stop)
        trainer.save(folder / f"step-{stop:06d}.pt")
    return Path(cfg.out_dir)


# ----------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``laser analyze``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help=f"run folder holding {CHECKPOINT_NAME}")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/analysis)")
    parser.add_argument("--batches", type=int, default=4, help="validation batches to record (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="less of everything (smoke test)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--train", metavar="PRESET", default=None,
                        help="first train a run of this preset into RUN_DIR (which must hold no checkpoint)")
    parser.add_argument("--method", default=None, help="with --train: method spec, e.g. laser:rank=64")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="with --train: override a setting (repeatable)")
    parser.add_argument("--snapshots", type=int, default=8,
                        help="with --train: evenly spaced checkpoints kept for the curves over training "
                             "(default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Analyze a training run: spectra, fidelity, linearity, INT8, gradients, depth scaling, per-site table."""
    try:
        if args.train is not None:
            if (Path(args.run_dir) / CHECKPOINT_NAME).exists():
                raise ValueError(f"{args.run_dir} already holds {CHECKPOINT_NAME}; drop --train to analyze it "
                                 "or choose another RUN_DIR")
            cfg = train_preset(args.train)
            if args.method is not None:
                cfg = with_method(cfg, parse_method_spec(args.method))
            cfg = dataclasses.replace(apply_overrides(cfg, args.sets), out_dir=str(args.run_dir))
            print(f"training {args.train} into {args.run_dir} with {args.snapshots} snapshots", flush=True)
            train_with_snapshots(cfg, args.snapshots)
        elif args.method is not None or args.sets:
            raise ValueError("--method and --set only apply with --train PRESET")
        path = analyze(args.run_dir, args.out, max_batches=args.batches, quick=args.quick, device=args.device,
                       progress=lambda line: print(line, flush=True))
    except (FileNotFoundError, ValueError) as err:
        parser = getattr(args, "parser", None)
        if parser is not None:
            parser.error(str(err))  # exits with code 2, like the other subcommands
        print(f"laser analyze: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``laser analyze RUN_DIR [--out DIR] [--batches N] ...`` to an argparse subparsers object."""
    parser = subparsers.add_parser("analyze", help="the paper's analyses of a training run", description=run.__doc__)
    add_arguments(parser)
    parser.set_defaults(run=run, parser=parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m laser.analysis.analyze RUN_DIR ...``: the same as ``laser analyze``."""
    parser = argparse.ArgumentParser(prog="laser analyze", description=run.__doc__)
    add_arguments(parser)
    parser.set_defaults(parser=parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
