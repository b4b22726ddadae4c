"""Host time per stored tensor: what the hooks and each method cost the thread that drives the device.

On an accelerator one Python thread queues the forward and backward; where kernels are short the step
lasts as long as that thread needs, and every tensor a method encodes and decodes adds its Python and
dispatch time, however fast the device. This measures that time where the kernels are negligible: the
TRM at the paper's depth, width 128 (rank 32), a 5x5 maze and batch 1 (25 rows per tensor: LASER's three
matmuls are about 0.3 M multiply-adds a tensor), on the CPU, so the step time is nearly all host time.
Per method: step time (median of interleaved rounds after warm-up), stored tensors per step and how many
of them the method encoded (from its report), and the host time it adds over ``none`` per encoded tensor:
``(t_method - t_none) / encoded``. For ``none`` the column is what the plumbing adds over ``bare`` (no
hooks) per stored tensor.

Multiply by the encoded tensors of a real step (the report's ``tensors - fallbacks``) for the host time a
method adds to it; a GPU step shorter than the host time of its forward and backward is host-bound.

    python benchmarks/host.py
    python benchmarks/host.py --methods laser laser-paper laser-int8 --depth 8
"""

from __future__ import annotations

import argparse

from common import (
    VARIANTS,
    MethodSpec,
    TrainingRun,
    Workload,
    add_timing_arguments,
    environment,
    interleaved_medians,
    markdown_table,
    method_specs,
    parse_timed,
    set_threads,
)

DEFAULT_METHODS = ["laser", "laser-paper", "laser-int8", "laser-s8", "quant8"]


def measure(workload: Workload, specs: list[MethodSpec], steps: int, warmup: int) -> list[list[str]]:
    """Rows of the table: per method the step time, tensors stored and encoded, host us per encoded tensor."""
    runs = {spec.label: TrainingRun(workload, spec) for spec in specs}
    for run in runs.values():
        for _ in range(warmup):
            run.step()
    times, _ = interleaved_medians({label: run.step for label, run in runs.items()}, steps)
    rows = []
    for label, run in runs.items():
        report = run.report()
        stored = sum(s.tensors for s in report.sites)
        encoded = stored - sum(s.fallbacks for s in report.sites)
        if label == "none":
            extra = (times["none"] - times["bare"]) / stored if "bare" in times and stored else None
        else:
            extra = (times[label] - times["none"]) / encoded if encoded and label != "bare" else None
        rows.append([label, f"{1000 * times[label]:.1f}", stored or "-", encoded if label != "none" else "-",
                     f"{1e6 * extra:.0f}" if extra is not None else "-"])
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(VARIANTS),
                        help="methods to time besides bare and none")
    parser.add_argument("--dim", type=int, default=128, help="width D")
    parser.add_argument("--depth", type=int, default=24, help="recursion depth (TRM L_cycles)")
    parser.add_argument("--rank", type=int, default=32, help="rank of the low-rank methods")
    add_timing_arguments(parser, warmup=3, steps=15)
    return parse_timed(parser, argv)


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    args = parse_args(argv)
    set_threads(args.threads)
    workload = Workload(args.dim, args.depth, batch=1, maze=5)
    specs = method_specs(["bare", *args.methods], [args.rank])
    rows = measure(workload, specs, args.steps, args.warmup)
    print(f"### Host time per stored tensor: {workload.title()}\n\n{environment('cpu')}; step time: median "
          f"of {args.steps} interleaved rounds after {args.warmup} warm-up steps.\n")
    print(markdown_table(["method", "step ms", "stored tensors", "encoded", "host us / tensor over none"], rows))


if __name__ == "__main__":
    main()
