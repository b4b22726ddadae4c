"""Where compression time goes: projection, accumulation, orthonormalisation, quantization, reconstruction,
sampling, fidelity sums, casts, plumbing and Python overhead, as shares of the method's time and of the step.

The library has no ``record_function`` labels, so ops are attributed by call stack: ``torch.profiler`` with
``with_stack=True`` records Python frames as parents of every aten op, and each op inside the method is
charged to the innermost library function above it (``sample_rows`` -> sampling, ``_accumulate`` ->
accumulation, ``decode`` -> reconstruction, ...); ops called by ``encode`` itself are told apart by name
(matmul -> projection, square/sum/isfinite -> fidelity sums). Times are ops' self times, so nothing is
counted twice. **Python overhead** is the rest: the method's own wall time (``method.seconds``: encode,
decode and update, measured in unprofiled steps) minus the op time attributed inside it; the profiler
slows Python down, so the op times come from profiled steps and the wall time from unprofiled ones.

Step times of ``bare`` (no saved-tensor hooks), ``none`` (the hooks, storing everything raw) and the method
are medians of interleaved rounds after warm-up; ``bare`` -> ``none`` is what the plumbing costs every
method (site naming and pack/unpack of every saved tensor, parameters included).

    python benchmarks/profile.py                                  # laser-paper, D 512, depth 8, rank 64
    python benchmarks/profile.py --method laser-guarded-int8 --dim 256 --depth 24 --rank 128
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile

from common import (
    VARIANTS,
    TrainingRun,
    Workload,
    add_timing_arguments,
    add_workload_arguments,
    check_device,
    environment,
    interleaved_medians,
    markdown_table,
    method_specs,
    parse_timed,
    set_threads,
    synchronizer,
)

# Python frames of the library as the profiler names them, e.g. "laser/methods/laser.py(85): encode".
LIBRARY_FRAME = re.compile(r"laser/(?:hooks|subspace|quant|methods/\w+)\.py\(\d+\): (\w+)$")
FUNCTION_PART = {
    "sample_rows": "sampling",
    "_accumulate": "accumulation",
    "decode": "reconstruction",
    "quantize_columns_int8": "quantization",
    "dequantize_columns_int8": "quantization",
    "quantize_groups": "quantization",
    "dequantize_groups": "quantization",
    "pack_bits": "quantization",
    "unpack_bits": "quantization",
    "update": "orthonormalisation",
    "power_step": "orthonormalisation",
    "orthonormalize": "orthonormalisation",
    "expand": "orthonormalisation",
    "top_k_basis": "orthonormalisation",
    "complete_basis": "orthonormalisation",
    "fidelity": "fidelity sums",
    "squared_norm": "fidelity sums",
    "add": "fidelity sums",  # CosineSums.add, the one fidelity sum
    "add_stored": "fidelity sums",
    "stored_sums": "fidelity sums",
    "finite": "fidelity sums",
    "cosine": "fidelity sums",
    "make_codes": "casts",
    "_basis_in": "casts",
    "_pack": "plumbing ops",
    "_unpack": "plumbing ops",
    "_new_entry": "plumbing ops",
    "_exact_view": "plumbing ops",
    "version_probe": "plumbing ops",
    "check_version": "plumbing ops",
    "decoded": "plumbing ops",
}
ENCODE_OP_PART = {
    "aten::mm": "projection",
    "aten::matmul": "projection",
    "aten::square": "fidelity sums",
    "aten::pow": "fidelity sums",
    "aten::sum": "fidelity sums",
    "aten::dot": "fidelity sums",
    "aten::linalg_vector_norm": "fidelity sums",
    "aten::isfinite": "fidelity sums",
    "aten::is_nonzero": "fidelity sums",
    "aten::item": "fidelity sums",
    "aten::_local_scalar_dense": "fidelity sums",
    "aten::to": "casts",
    "aten::_to_copy": "casts",
    "aten::copy_": "casts",
}
PARTS = ["projection", "accumulation", "reconstruction", "orthonormalisation", "quantization", "sampling",
         "fidelity sums", "casts", "plumbing ops", "other ops"]


def part_of(event: object) -> str | None:
    """The part of compression an aten op belongs to, from its innermost library frame; None outside it.

    Ops called by ``encode`` itself are told apart by the name of the outermost op under that frame, so
    the ``abs`` inside ``isfinite`` counts with ``isfinite``.
    """
    outermost = event
    parent = event.cpu_parent
    while parent is not None:
        match = LIBRARY_FRAME.search(parent.name)
        if match:
            function = match.group(1)
            if function == "encode":
                return ENCODE_OP_PART.get(outermost.name, "other ops")
            if function in FUNCTION_PART:
                return FUNCTION_PART[function]
        if parent.name.startswith("aten::"):
            outermost = parent
        parent = parent.cpu_parent
    return None


def attribute(events: list, device: str) -> tuple[dict[str, float], dict[tuple[str, str], list[float]]]:
    """Self seconds per part of every aten op inside the method, and per (op, part): [seconds, calls]."""
    parts: dict[str, float] = defaultdict(float)
    ops: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        part = part_of(event)
        if part is None:
            continue
        micros = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        parts[part] += micros / 1e6
        ops[event.name, part][0] += micros / 1e6
        ops[event.name, part][1] += 1
    return parts, ops


def method_seconds_per_step(run: TrainingRun, steps: int) -> dict[str, float]:
    """Median wall seconds per step the method spends encoding, decoding and updating (unprofiled)."""
    samples: dict[str, list[float]] = {key: [] for key in run.method.seconds}
    for _ in range(steps):
        before = dict(run.method.seconds)
        run.step()
        for key in samples:
            samples[key].append(run.method.seconds[key] - before[key])
    return {key: statistics.median(values) for key, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    """Print the table of parts, the step times, and the ops inside the method."""
    ranked = [name for name, (_, _, takes_rank, _) in VARIANTS.items() if takes_rank]
    compressing = [*ranked, "quant8", "quant4"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="laser-paper", choices=compressing)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8, help="recursion depth n (L_cycles)")
    parser.add_argument("--rank", type=int, default=64)
    add_workload_arguments(parser)
    add_timing_arguments(parser, steps_help="timed rounds, and unprofiled steps for wall time")
    parser.add_argument("--profiled", type=int, default=2, help="profiled steps")
    parser.add_argument("--top", type=int, default=12, help="rows of the table of ops")
    args = parse_timed(parser, argv)
    if args.profiled < 1:
        parser.error("--profiled must be >= 1")
    check_device(args.device)
    set_threads(args.threads)

    workload = Workload(args.dim, args.depth, args.batch, args.maze, args.device, args.amp)
    specs = method_specs(["bare", args.method], [args.rank])  # none, bare, method
    runs = {spec.label: TrainingRun(workload, spec) for spec in specs}
    for run in runs.values():
        for _ in range(args.warmup):
            run.step()
    times, rounds = interleaved_medians({label: run.step for label, run in runs.items()}, args.steps,
                                        synchronizer(args.device))
    label = specs[-1].label
    run = runs[label]
    wall = method_seconds_per_step(run, args.steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities, with_stack=True) as prof:
        for _ in range(args.profiled):
            run.step()
    parts, ops = attribute(prof.events(), args.device)

    step = times[label]
    total = sum(wall.values())
    rows = [[part, f"{1000 * parts[part] / args.profiled:.2f}", f"{100 * parts[part] / args.profiled / total:.1f}%",
             f"{100 * parts[part] / args.profiled / step:.1f}%"] for part in PARTS]
    python = total - sum(parts.values()) / args.profiled
    rows.append(["Python overhead (rest)", f"{1000 * python:.2f}", f"{100 * python / total:.1f}%",
                 f"{100 * python / step:.1f}%"])
    rows.append(["total (encode + decode + update)", f"{1000 * total:.2f}", "100.0%", f"{100 * total / step:.1f}%"])
    print(f"### where {label} spends its time: {workload.title()}\n")
    print(f"{environment(args.device)}; step times: median of {rounds} interleaved rounds after {args.warmup} "
          f"warm-up steps; op times: {args.profiled} profiled steps; method wall time: median of {args.steps} "
          f"unprofiled steps (encode {1000 * wall['encode']:.1f} ms, decode {1000 * wall['decode']:.1f} ms, "
          f"update {1000 * wall['update']:.1f} ms per step).\n")
    print(markdown_table(["part", "ms / step", "share of method time", "share of step"], rows))
    print("\nstep times\n")
    print(markdown_table(["run", "ms / step", "vs none"],
                         [[name, f"{1000 * t:.1f}", f"{t / times['none']:.3f}"] for name, t in times.items()]))
    print(f"\nops inside {label} by self time (per step)\n")
    top = sorted(ops.items(), key=lambda item: -item[1][0])[: args.top]
    print(markdown_table(["op", "part", "ms / step", "calls / step"],
                         [[op, part, f"{1000 * s / args.profiled:.2f}", f"{n / args.profiled:.1f}"]
                          for (op, part), (s, n) in top]))


if __name__ == "__main__":
    main()
