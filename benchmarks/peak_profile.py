"""What is alive at the peak of one training step: tensors by kind and size, from PyTorch's memory profiler.

``step.py`` measures a step's peak; this says what it is made of. One warmed-up step of each method runs under
``torch.profiler`` with memory profiling. Replaying the profiler's allocation timeline gives the moment of the
highest total, and the profiler's nested events what was running then (autograd node > module > torch op). The
tensors alive then are listed, grouped by the profiler's category (``PARAMETER``,
``OPTIMIZER_STATE``, ``GRADIENT``, ``ACTIVATION``, ``TEMPORARY``, ``AUTOGRAD_DETAIL``: tensors made inside
autograd's backward, ``INPUT``, ``unknown``) and by size; LASER's own state (bases, accumulators ``X^T Z``,
row samples) is named as such, matched by address and size to the compressor's tensors before its update. The
peak is above the memory alive when the step began; that starting memory is printed too, so the rise is the
difference.

    python benchmarks/peak_profile.py --dims 512 --depths 8 --ranks 128 --batch 8 \\
        --methods checkpoint laser-int8+checkpoint laser-int8+coded-checkpoint

The categories come from ``torch.profiler._memory_profiler``, a private module: they name what the profiler
could infer, and a tensor it cannot place is ``unknown``.
"""

from __future__ import annotations

import argparse
from collections import Counter

from torch.profiler import ProfilerActivity, profile
from torch.profiler import _memory_profiler as memory_profiler

import laser
from common import VARIANTS, TrainingRun, Workload, check_device, markdown_table, method_specs, set_threads, size

MIN_BYTES = 256 * 1024  # smaller tensors are summed into one row per category


def own_tensors(method) -> dict[tuple[int, int], str]:
    """``(storage address, bytes) -> role`` of a LASER compressor's own tensors as they are now (read it before
    :meth:`~laser.Compressor.step` frees the step's state): the sites' bases and memories, the step's
    accumulators ``X^T Z``, row samples and their keys, and bases cast for the step's matmuls."""
    if not isinstance(method, laser.Compressor):
        return {}
    owned = {}

    def add(tensor, role: str) -> None:
        if tensor is not None:
            owned[(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())] = role

    for state in method.sites.values():
        add(state.basis, "laser: basis")
        add(state.memory, "laser: memory")
    for stats in method.stats.values():
        add(stats.accumulator, "laser: accumulator")
        add(stats.sample, "laser: row sample")
        add(stats.sample_keys, "laser: row sample")
        for cast in stats.casts.values():
            add(cast, "laser: basis")
    return owned


def live_at_peak(prof: profile, device: str,
                 owned: dict[tuple[int, int], str] | None = None) -> tuple[int, int, Counter, list[str]]:
    """``(start, peak, tensors, where)``: bytes alive on ``device`` when the profile began and at its peak, the
    tensors alive at the peak as ``(category, bytes) -> count`` (tensors under :data:`MIN_BYTES` as
    ``(category, 0)`` -> their summed bytes), and what was running then (:func:`running_at`). A tensor whose
    address and size are in ``owned`` (:func:`own_tensors`) is counted under its role there instead of the
    profiler's category (by address alone for a tensor alive before the profile, which the profiler sizes by
    the view it saw: a basis sliced from a batched storage). Tensors of :data:`MIN_BYTES` or more are keyed by
    ``(category, bytes, origin)``, the origin being what allocated them (:func:`allocated_in`)."""
    memory_profile = prof._memory_profile()
    timeline = memory_profiler.MemoryProfileTimeline(memory_profile)
    live: dict[object, tuple[int, object]] = {}  # tensor -> (bytes, category of its current version)
    born: dict[object, int] = {}  # tensor -> when it was allocated
    preexisting = set()  # tensors alive before the profile: the profiler sizes them by the view it saw
    total = start = best = when = 0
    started, snapshot = False, {}
    for time_ns, action, (key, version), nbytes in timeline.timeline:
        if key.device.type != device:
            continue
        if action != memory_profiler.Action.PREEXISTING and not started:
            start, best, snapshot, started = total, total, dict(live), True
        if action == memory_profiler.Action.PREEXISTING:
            preexisting.add(key)
        if action == memory_profiler.Action.CREATE:
            born[key] = time_ns
        if action in (memory_profiler.Action.PREEXISTING, memory_profiler.Action.CREATE):
            total += nbytes - live.get(key, (0, None))[0]
            live[key] = (nbytes, timeline.categories.get(key, version))
        elif action == memory_profiler.Action.INCREMENT_VERSION and key in live:
            live[key] = (live[key][0], timeline.categories.get(key, version))
        elif action == memory_profiler.Action.DESTROY:
            total -= live.pop(key, (0, None))[0]
        if started and total > best:
            best, snapshot, when = total, dict(live), time_ns
    tensors: Counter = Counter()
    events = memory_profile._op_tree.sorted_nodes
    owned = owned or {}
    owned_at = {ptr: role for (ptr, _), role in owned.items()}
    for key, (nbytes, category) in snapshot.items():
        name = category.name if category is not None else "unknown"
        if isinstance(key, memory_profiler.TensorKey):
            fallback = owned_at.get(key.storage.ptr, name) if key in preexisting else name
            name = owned.get((key.storage.ptr, nbytes), fallback)
        if nbytes >= MIN_BYTES:
            origin = allocated_in(events, born[key]) if key in born else "before the profile"
            tensors[(name, nbytes, origin)] += 1
        else:
            tensors[(name, 0, "")] += nbytes
    return start, best, tensors, running_at(events, when)


def allocated_in(events, time_ns: int) -> str:
    """What allocated a tensor at ``time_ns``: the innermost frame of this repository's code (``laser/...``)
    and the outermost torch op running then (the one the code called), as
    ``"laser/factored.py(121): backward > aten::matmul"``."""
    inside = sorted((e for e in events if e.start_time_ns <= time_ns <= e.end_time_ns), key=lambda e: e.start_time_ns)
    frames = [e.name for e in inside if ".py(" in e.name and e.name.startswith("laser/")]
    ops = [e.name for e in inside if e.name.startswith("aten::")]
    return " > ".join(part for part in (frames[-1] if frames else "", ops[0] if ops else "") if part) or "-"


def running_at(events, time_ns: int) -> list[str]:
    """The autograd nodes, modules and torch ops running at ``time_ns``, outermost first (the profiler's
    nested events that contain that moment, Python frames left out)."""
    inside = [e for e in events if e.start_time_ns <= time_ns <= e.end_time_ns]
    keep = ("autograd::engine::evaluate_function: ", "nn.Module: ", "aten::")
    names = [e.name for e in sorted(inside, key=lambda e: e.start_time_ns) if e.name.startswith(keep)]
    return [name.removeprefix(keep[0]).removeprefix(keep[1]) for name in names]


def profile_step(workload: Workload, spec, warmup: int) -> tuple[int, int, Counter, list[str]]:
    """Warm a run of ``spec`` up, then profile one step: :func:`live_at_peak` of it, LASER's own tensors named
    by their role (read just before the method's update, when the step's state is complete)."""
    run = TrainingRun(workload, spec)
    for _ in range(warmup):
        run.step()
    owned: dict[tuple[int, int], str] = {}
    if run.method is not None:
        update = run.method.update

        def recording_update() -> None:
            owned.update(own_tensors(run.method))
            update()

        run.method.update = recording_update
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run.step()
    return live_at_peak(prof, workload.device, owned)


def table(start: int, peak: int, tensors: Counter, where: list[str]) -> str:
    """The tensors alive at the peak, largest groups first."""
    rows = []
    for (category, nbytes, origin), count in sorted(tensors.items(), key=lambda kv: -(kv[0][1] * kv[1] or kv[1])):
        if nbytes:
            rows.append([category, size(nbytes), str(count), size(nbytes * count), origin])
        else:
            rows.append([category, f"< {size(MIN_BYTES)}", "-", size(count), ""])
    head = (f"alive when the step began {size(start)}; at its peak {size(peak)} (rise {size(peak - start)}), "
            f"inside: {' > '.join(where) or '(no op)'}\n\n")
    return head + markdown_table(["category", "tensor", "count", "bytes", "allocated in"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, default=512, help="width D")
    parser.add_argument("--depths", type=int, default=8, help="recursion depth n (L_cycles)")
    parser.add_argument("--ranks", type=int, default=128, help="LASER initial rank")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--maze", type=int, default=11, help="maze side (sequence length maze^2)")
    parser.add_argument("--methods", nargs="+", default=["checkpoint", "laser-int8+coded-checkpoint"],
                        choices=list(VARIANTS), metavar="METHOD", help=f"from: {', '.join(VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the profiled one")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    check_device("cpu")
    set_threads(args.threads)
    workload = Workload(args.dims, args.depths, args.batch, args.maze, "cpu", "none")
    print(f"### What is alive at the step's peak: {workload.title()}\n")
    for spec in method_specs(args.methods, [args.ranks]):
        if spec.label == "none" and "none" not in args.methods:
            continue
        print(f"#### {spec.label}\n\n{table(*profile_step(workload, spec, args.warmup))}\n", flush=True)


if __name__ == "__main__":
    main()
