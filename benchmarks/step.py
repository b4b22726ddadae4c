"""Training-step time, saved bytes and peak memory of every activation-memory method on the looped TRM block.

For each width D, recursion depth n (TRM ``L_cycles``) and LASER rank, one table: ``none``, ``laser`` with
policy ``paper`` and ``guarded`` (codes in the activation dtype and int8), ``quant`` at 8 and 4 bits and
``checkpoint`` (``TRMConfig(checkpoint=True)``: each block call recomputed in backward, with ``none``);
``laser-int8+checkpoint`` codes what checkpointing keeps, ``laser(-int8)+coded-checkpoint`` also what it recomputes
(``coded_recompute=True``: ``laser.checkpoint``).
PyTorch's own options are peers (``common.wrap_blocks``): ``sac`` runs the block under selective activation
checkpointing (matmul and attention outputs saved, everything else recomputed), ``compile-budget`` compiles
the block with inductor under ``torch._functorch.config.activation_memory_budget`` (``--memory-budget``);
``laser+sac`` and ``laser+compile-budget`` add LASER's hooks around them. A compile variant that fails or
takes longer than ``--compile-timeout`` seconds in a fresh process is skipped, with the reason under the table.
A step is forward + backward + the method's update + AdamW, on maze batches (``laser.data.maze``), from
the same initial weights for every method. Columns:

* **peak**: peak RSS of a fresh process over one step on a CPU, ``torch.cuda.max_memory_allocated`` on a
  GPU; **step rise**: that peak minus the memory in use before the step (model, optimizer, data). First:
  what decides whether a step fits is its peak, not the bytes it stores.
* **saved (report)**: saved-activation bytes the method's report counts for the last step (unique storages:
  codes, scales, bases, storages kept raw, and LASER's own per-step state: its accumulators ``X^T Z``,
  sampled rows and the fp32 master of a bf16 basis copy, ``SiteReport.state_bytes``). Under ``checkpoint``
  it counts what autograd keeps outside the recomputed calls.
* **held after fwd**: bytes the forward allocated and left alive for backward, from the allocator (see
  ``common.py``): measured rather than counted, so it also holds what the forward kept alive besides
  saved tensors.
* **step time**: median over interleaved rounds after warm-up (a site's first step codes each tensor against
  its own SVD basis and samples rows for the shared one: one-off SVDs).

Every ratio is to ``none`` measured in the same run.

    python benchmarks/step.py                                   # default grid: a few minutes on 1 CPU thread
    python benchmarks/step.py --dims 512 --depths 8 24 48 --ranks 128 --methods laser-paper checkpoint
    python benchmarks/step.py --full --device cuda --amp bf16 --batch 64   # whole grid, on a GPU
    python benchmarks/step.py --dims 128 --depths 6 --ranks 32 --batch 8 --methods checkpoint sac laser laser+sac
"""

from __future__ import annotations

import argparse
import gc

import torch

from common import (
    VARIANTS,
    MethodSpec,
    TrainingRun,
    Workload,
    compile_preflight,
    environment,
    grid_parser,
    grid_workloads,
    interleaved_medians,
    markdown_table,
    method_specs,
    parse_timed,
    probe_memory,
    probe_memory_fresh,
    ranks_reached,
    ratio,
    size,
    synchronizer,
)

DEFAULT_METHODS = ["none", "laser-paper", "laser-paper-int8", "laser-guarded", "laser-guarded-int8", "quant8",
                   "quant4", "checkpoint"]
FULL_GRID = {"dims": [256, 512, 1024], "depths": [8, 24, 48], "ranks": [64, 128, 256]}
# Peak step memory first (issue 14.3): what decides whether a step fits, then the bytes behind it.
HEADERS = ["method", "ranks", "peak", "vs none", "step rise", "vs none", "saved (report)", "vs none",
           "held after fwd", "vs none", "step time", "vs none"]


def measure(workload: Workload, specs: list[MethodSpec], args: argparse.Namespace) -> tuple[dict, int]:
    """Time all methods interleaved in this process, then probe each one's memory alone.

    Returns ``{label: {"time", "ranks", "held", "peak", "rise", "stored"}}`` and the rounds timed; a compile
    variant that cannot run here (see :func:`common.compile_preflight`) gets ``{"skipped": reason}`` instead.
    """
    skipped = {spec.label: reason for spec in specs
               if (reason := compile_preflight(workload, spec, args.compile_timeout)) is not None}
    specs = [spec for spec in specs if spec.label not in skipped]
    runs = {spec.label: TrainingRun(workload, spec) for spec in specs}
    for run in runs.values():
        for _ in range(args.warmup):
            run.step()
    times, rounds = interleaved_medians({label: run.step for label, run in runs.items()}, args.steps,
                                        synchronizer(workload.device), args.budget)
    results = {label: {"time": times[label], "ranks": ranks_reached(run.report())}
               for label, run in runs.items()}
    del runs
    gc.collect()
    for spec in specs:
        if args.memory == "fresh":
            results[spec.label] |= probe_memory_fresh(workload, spec, args.warmup)
        elif args.memory == "inprocess":
            results[spec.label] |= probe_memory(workload, spec, args.warmup)
            gc.collect()
            if workload.device == "cuda":
                torch.cuda.empty_cache()
    return results | {label: {"skipped": reason} for label, reason in skipped.items()}, rounds


def table(workload: Workload, specs: list[MethodSpec], results: dict, rounds: int, args: argparse.Namespace) -> str:
    """The markdown table of one workload, titled with how it was measured."""
    base = results["none"]
    rows, notes = [], []
    for spec in specs:
        r = results[spec.label]
        if "skipped" in r:
            rows.append([spec.label, *["-"] * 9, "skipped", "-"])
            notes.append(f"{spec.label} skipped: {r['skipped']}.")
            continue
        rows.append([
            spec.label, r["ranks"],
            size(r.get("peak")), ratio(r.get("peak"), base.get("peak")),
            size(r.get("rise")), ratio(r.get("rise"), base.get("rise")),
            size(r.get("stored")), ratio(r.get("stored"), base.get("stored")),
            size(r.get("held")), ratio(r.get("held"), base.get("held")),
            f"{1000 * r['time']:.1f} ms", ratio(r["time"], base["time"]),
        ])
        if r.get("recomputed"):
            tensors, raw, stored = r["recomputed"]
            notes.append(f"{spec.label}: the step's reruns (`report.recomputed`, held one block call at a time, not in "
                         f"saved): {tensors} tensors, {size(raw)} raw, stored as {size(stored)}.")
    peak = {"fresh": "peak RSS of a fresh process", "inprocess": (
        "max_memory_allocated" if workload.device == "cuda" else "peak RSS in this process"),
        "off": "not measured"}[args.memory]
    title = (f"### {workload.title()}\n\n{environment(workload.device)}; step time: median of {rounds} "
             f"interleaved rounds after {args.warmup} warm-up steps; peak: {peak}.\n")
    note = "".join(f"\n{line}\n" for line in notes)
    return f"{title}\n{markdown_table(HEADERS, rows)}\n{note}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings (see ``--help``)."""
    parser = grid_parser(__doc__, list(VARIANTS), DEFAULT_METHODS, "methods to compare (none is always included)")
    parser.add_argument("--full", action="store_true", help="the whole grid D x n x rank (meant for a GPU)")
    parser.add_argument("--budget", type=float, default=None, help="stop timing a shape after this many seconds")
    parser.add_argument("--memory", choices=["fresh", "inprocess", "off"], default=None,
                        help="memory probe: fresh process (CPU default), in this process (GPU default), or off")
    parser.add_argument("--memory-budget", type=float, default=0.5,
                        help="torch._functorch.config.activation_memory_budget of the compile variants")
    parser.add_argument("--compile-timeout", type=float, default=120.0,
                        help="skip a compile variant whose fresh-process check takes longer (seconds)")
    args = parse_timed(parser, argv)
    if not 0.0 <= args.memory_budget <= 1.0:
        parser.error(f"--memory-budget must be in [0, 1], got {args.memory_budget}")
    if args.full:
        args.dims, args.depths, args.ranks = FULL_GRID["dims"], FULL_GRID["depths"], FULL_GRID["ranks"]
    if args.memory is None:
        args.memory = "inprocess" if args.device == "cuda" else "fresh"
    return args


def main(argv: list[str] | None = None) -> None:
    """Print one table per width and depth."""
    args = parse_args(argv)
    specs = method_specs(args.methods, args.ranks, args.memory_budget)
    for workload in grid_workloads(args):
        results, rounds = measure(workload, specs, args)
        print(table(workload, specs, results, rounds, args), flush=True)


if __name__ == "__main__":
    main()
