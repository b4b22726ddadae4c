"""Helpers shared by the benchmark scripts: threads and load, interleaved timing, memory probes, the TRM
workload on maze batches, the catalogue of methods, and markdown tables.

Measuring on a shared CPU: with several OpenMP threads, small kernels and LAPACK calls spin-wait and get
pathologically slow when other jobs load the machine, so every script takes ``--threads`` (1 by default)
and prints the thread count and the load average next to its tables. Step times are medians over
interleaved repetitions (every method runs once per round), so a change of load hits all methods alike,
and they are only reported as ratios to ``none`` measured in the same run.

Memory is probed one method at a time, after warm-up (in a site's first step LASER codes each tensor
against its own SVD basis and samples rows for the shared one: not a typical step):

* **held after forward**: bytes the forward allocated and left alive for backward (saved activations,
  codes, bases made during the forward, the method's per-step statistics), measured from the allocator:
  ``torch.cuda.memory_allocated`` on a GPU, the CPU profiler's allocation events on a CPU;
* **peak**: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the peak RSS of the process over one
  step (Linux ``VmHWM``, reset after warm-up through ``/proc/self/clear_refs``), in a fresh process whose
  ``malloc`` hands freed blocks back to the system, so RSS follows live memory;
* **step rise**: the peak minus the memory in use just before the step (model, optimizer state, data).

``python benchmarks/common.py --probe JSON`` is the fresh-process entry point; the scripts call it.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import laser
from laser.data.maze import generate
from laser.models.trm import TRM, TRMConfig
from laser.report import Report, format_bytes

HERE = Path(__file__).resolve().parent
# A script run from this folder puts the folder first on sys.path, where benchmarks/profile.py shadows the
# standard library's `profile` that cProfile needs (torch imports cProfile lazily, e.g. on an optimizer's
# first step). Every script imports this module before that happens: keep the folder last.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
HEAD_DIM = 64  # the paper's width per head (512 / 8); a width D gets D / 64 heads
RESULT = "RESULT "  # prefix of the JSON line a fresh process prints (libraries may print other lines)
# Fresh processes allocate every block above 16 KiB with mmap and trim the heap above 16 KiB, so freed
# tensors go back to the system at once and RSS tracks live memory. (At glibc's default 128 KiB, a method
# storing many small records, quant4 at depth 24, showed a step rise below its bytes held after forward.)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "16384"}


# ----------------------------------------------------------------------------- environment


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (``--threads``)."""
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as printed next to every table."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def environment(device: str) -> str:
    """One line saying where numbers were measured: torch, device, threads and the load average now."""
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    return (f"torch {torch.__version__}, {device} ({where}), {torch.get_num_threads()} thread(s), "
            f"load average {load_average()} (1/5/15 min)")


def check_device(device: str) -> None:
    """Fail early, naming ``--device``, when a GPU is asked for and none is present."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")


def synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


# ----------------------------------------------------------------------------- timing


def interleaved_medians(
    steps: dict[str, Callable[[], None]],
    rounds: int,
    synchronize: Callable[[], None] = lambda: None,
    budget_s: float | None = None,
) -> tuple[dict[str, float], int]:
    """Median seconds of each callable over ``rounds`` rounds, and the number of rounds run.

    Every round runs each callable once, in alternating order, so drift in machine load hits all alike.
    With ``budget_s`` the rounds stop once that many seconds have passed (after at least 3 rounds).
    """
    if rounds < 1:
        raise ValueError(f"--steps must be >= 1 timed step, got {rounds}")
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    done = 0
    while done < rounds:
        for name in names if done % 2 == 0 else reversed(names):
            synchronize()
            begin = time.perf_counter()
            steps[name]()
            synchronize()
            times[name].append(time.perf_counter() - begin)
        done += 1
        if budget_s is not None and done >= 3 and time.perf_counter() - start > budget_s:
            break
    return {name: statistics.median(t) for name, t in times.items()}, done


# ----------------------------------------------------------------------------- tables


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table: the first column left-aligned, the others right-aligned."""
    if any(len(row) != len(headers) for row in rows):
        raise ValueError(f"every row needs {len(headers)} cells ({', '.join(headers)})")
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = [headers, align, *[[str(cell) for cell in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def ratio(value: float | None, base: float | None) -> str:
    """``value / base`` to three decimals, or a dash when either is missing or the base is zero."""
    if value is None or not base:
        return "-"
    return f"{value / base:.3f}"


def size(value: float | None) -> str:
    """Bytes in binary units, or a dash."""
    return "-" if value is None else format_bytes(value)


# ----------------------------------------------------------------------------- command line


def grid_parser(description: str, methods: Sequence[str], default_methods: Sequence[str],
                methods_help: str) -> argparse.ArgumentParser:
    """A parser with the workload grid and timing arguments of the grid scripts (``step.py``, ``floor.py``).

    Widths, depths, ranks, methods (from ``methods``), and :func:`add_workload_arguments` and
    :func:`add_timing_arguments`; a script adds its own arguments and parses with :func:`parse_timed`.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512], help="widths D")
    parser.add_argument("--depths", type=int, nargs="+", default=[8], help="recursion depths n (L_cycles)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[64], help="LASER initial ranks")
    parser.add_argument("--methods", nargs="+", default=list(default_methods), choices=list(methods),
                        metavar="METHOD", help=f"{methods_help}, from: {', '.join(methods)}")
    add_workload_arguments(parser)
    add_timing_arguments(parser)
    return parser


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch``, ``--maze``, ``--device`` and ``--amp``: the workload settings besides its shape."""
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--maze", type=int, default=11, help="maze side (sequence length maze**2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="none", choices=["none", "bf16"], help="bf16 autocast of the forward")


def add_timing_arguments(parser: argparse.ArgumentParser, warmup: int = 2, steps: int = 5,
                         steps_help: str = "timed rounds (each runs every method once)") -> None:
    """``--warmup``, ``--steps`` and ``--threads``, checked by :func:`parse_timed`."""
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps before measuring (>= 1)")
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")


def parse_timed(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; fail naming ``--warmup`` when it would time a site's first step (stored raw while
    LASER initialises its basis: not a typical step)."""
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: a site's first step (per-tensor SVD bases, rows sampled for the shared "
                     "basis) is not a typical step")
    return args


def grid_workloads(args: argparse.Namespace) -> list[Workload]:
    """Check the device, set the threads, and list the workloads of the grid: every width x depth."""
    check_device(args.device)
    set_threads(args.threads)
    return [Workload(dim, depth, args.batch, args.maze, args.device, args.amp)
            for dim in args.dims for depth in args.depths]


# ----------------------------------------------------------------------------- methods


@dataclass
class MethodSpec:
    """A method as the benchmarks name it: a ``laser.methods`` name with options, and how the block recomputes.

    ``name=None`` is the bare model: no saved-tensor hooks at all (what ``none``'s plumbing costs).
    ``checkpoint``: ``TRMConfig(checkpoint=True)``, each block-stack call recomputed in backward;
    ``coded_recompute``: through ``laser.checkpoint``, so the method stores the recomputed activations too.
    ``recompute``: one of PyTorch's own options wrapped around the TRM block (see :func:`wrap_blocks`):
    ``"sac"`` (selective activation checkpointing: matmul and attention outputs saved, the rest recomputed)
    or ``"compile"`` (``torch.compile`` of the block with ``activation_memory_budget``).
    """

    label: str
    name: str | None = "none"
    options: dict = field(default_factory=dict)
    checkpoint: bool = False
    recompute: str | None = None
    memory_budget: float = 0.5
    coded_recompute: bool = False

    @property
    def rank(self) -> int | None:
        """The initial rank of a low-rank method, else None."""
        return self.options.get("rank")


# variant -> (laser.methods name, options, takes a rank, recompute: None, "checkpoint", "coded" (laser.checkpoint),
# "sac" or "compile")
VARIANTS: dict[str, tuple[str | None, dict, bool, str | None]] = {
    "bare": (None, {}, False, None),
    "none": ("none", {}, False, None),
    "laser": ("laser", {}, True, None),
    "laser-int8": ("laser", {"quantize": "int8"}, True, None),
    "laser-paper": ("laser", {"policy": "paper"}, True, None),
    "laser-paper-int8": ("laser", {"policy": "paper", "quantize": "int8"}, True, None),
    "laser-guarded": ("laser", {"policy": "guarded"}, True, None),
    "laser-guarded-int8": ("laser", {"policy": "guarded", "quantize": "int8"}, True, None),
    "laser-s8": ("laser", {"accumulate_stride": 8}, True, None),
    "laser-s8-int8": ("laser", {"accumulate_stride": 8, "quantize": "int8"}, True, None),
    "laser-ref": ("laser", {"matmul_dtype": "float32"}, True, None),
    "laser-recon": ("laser", {"factored": False}, True, None),  # every coded tensor reconstructed in backward
    "laser-int8+checkpoint": ("laser", {"quantize": "int8"}, True, "checkpoint"),
    "laser-s8-int8+checkpoint": ("laser", {"accumulate_stride": 8, "quantize": "int8"}, True, "checkpoint"),
    # laser.checkpoint: the recomputed block's activations stored as the method's codes too
    "laser+coded-checkpoint": ("laser", {}, True, "coded"),
    "laser-int8+coded-checkpoint": ("laser", {"quantize": "int8"}, True, "coded"),
    "laser-s8-int8+coded-checkpoint": ("laser", {"accumulate_stride": 8, "quantize": "int8"}, True, "coded"),
    "quant8": ("quant", {"bits": 8}, False, None),
    "quant4": ("quant", {"bits": 4}, False, None),
    "checkpoint": ("none", {}, False, "checkpoint"),
    # PyTorch's own options as peers (issue 14), alone and with LASER compressing what they still save.
    "sac": ("none", {}, False, "sac"),
    "laser+sac": ("laser", {}, True, "sac"),
    "compile-budget": ("none", {}, False, "compile"),
    "laser+compile-budget": ("laser", {}, True, "compile"),
}


def method_specs(variants: Sequence[str], ranks: Sequence[int], memory_budget: float = 0.5) -> list[MethodSpec]:
    """One spec per variant, and per rank for the variants that take one (labels like ``laser-paper r64``).

    ``none`` comes first whether asked for or not: every ratio is taken to it. ``memory_budget`` is the
    ``activation_memory_budget`` of the ``compile`` variants.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if not ranks or any(r < 1 for r in ranks):
        raise ValueError(f"--ranks must be positive integers, got {list(ranks)}")
    specs = [MethodSpec("none")]
    for variant in dict.fromkeys(variants):
        if variant == "none":
            continue
        name, options, ranked, recompute = VARIANTS[variant]
        ckpt, coded = recompute in ("checkpoint", "coded"), recompute == "coded"
        wrap = recompute if recompute in ("sac", "compile") else None
        if ranked:
            specs += [MethodSpec(f"{variant} r{r}", name, {**options, "rank": r, "max_rank": max(512, r)}, ckpt,
                                 wrap, memory_budget, coded) for r in ranks]
        else:
            specs.append(MethodSpec(variant, name, dict(options), ckpt, wrap, memory_budget, coded))
    return specs


# ----------------------------------------------------------------------------- PyTorch's own options

_ATEN = torch.ops.aten
# What selective activation checkpointing keeps: the outputs of matmuls and of fused attention (the ops
# whose recomputation costs FLOPs); every pointwise op, norm and RoPE rotation is recomputed in backward.
SAC_SAVED_OPS = frozenset(
    getattr(_ATEN, op).default
    for op in ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_cudnn_attention")
    if hasattr(_ATEN, op)
)


def sac_policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    """Save matmul and attention outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAC_SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class SelectiveCheckpoint(nn.Module):
    """A TRM block run under ``torch.utils.checkpoint`` with the selective policy :func:`sac_policy`.

    Non-reentrant checkpoint: what the policy saves is kept by the checkpoint's own cache, not through
    saved-tensor hooks, so an outer LASER sees only what is saved outside the blocks.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor, cos_sin: object) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.block(h, cos_sin)
        return checkpoint(self.block, h, cos_sin, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, sac_policy))


class CompiledBlock(nn.Module):
    """A TRM block compiled by ``torch.compile(backend="inductor")`` under an ``activation_memory_budget``.

    The budget (a fraction of the activation bytes the default partitioner would save) is read when the
    forward graph is partitioned, at the first call of each new graph, so it is patched in around every
    call. The block, not the loop, is compiled: the loop then calls one graph per recursion step, and an
    outer LASER sees the graph's saved tensors (named by their order in it) once per step.
    """

    def __init__(self, block: nn.Module, memory_budget: float) -> None:
        super().__init__()
        if not 0.0 <= memory_budget <= 1.0:
            raise ValueError(f"--memory-budget must be in [0, 1], got {memory_budget}")
        self.memory_budget = memory_budget
        self.block = torch.compile(block, backend="inductor")

    def forward(self, h: torch.Tensor, cos_sin: object) -> torch.Tensor:
        with torch._functorch.config.patch(activation_memory_budget=self.memory_budget):
            return self.block(h, cos_sin)


def wrap_blocks(model: TRM, spec: MethodSpec) -> TRM:
    """Wrap every block the TRM loop calls (``model.blocks``) in the spec's PyTorch option, in place.

    ``TRM._net`` calls each module of ``model.blocks``; replacing the list's modules leaves ``trm.py`` as it
    is. Parameters keep their order (gradients line up with the plain model's by position).
    """
    if spec.recompute is None:
        return model
    if spec.recompute == "sac":
        model.blocks = nn.ModuleList(SelectiveCheckpoint(block) for block in model.blocks)
    elif spec.recompute == "compile":
        model.blocks = nn.ModuleList(CompiledBlock(block, spec.memory_budget) for block in model.blocks)
    else:
        raise ValueError(f"unknown recompute {spec.recompute!r}; choose from sac, compile")
    return model


# ----------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """One benchmark shape: the TRM block at width ``dim`` looped ``depth`` times, on maze batches.

    ``depth`` is TRM's ``L_cycles``: a step runs the block ``depth + 1`` times with grad (``depth`` latent
    updates and one answer update). ``maze`` is the maze side; the sequence has ``maze**2`` tokens.
    """

    dim: int
    depth: int
    batch: int
    maze: int = 11
    device: str = "cpu"
    amp: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"--amp must be 'none' or 'bf16', got {self.amp!r}")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")
        self.trm_config()  # TRMConfig names the setting when a width or depth is impossible

    def trm_config(self, checkpoint: bool = False, coded_recompute: bool = False) -> TRMConfig:
        """The TRM of this shape: D / 64 heads, SwiGLU expansion 4, one block, one H cycle (``checkpoint`` and
        ``coded_recompute``: see :class:`MethodSpec`)."""
        return TRMConfig(hidden=self.dim, heads=max(1, self.dim // HEAD_DIM), L_cycles=self.depth,
                         seq_len=self.maze**2, checkpoint=checkpoint, coded_recompute=coded_recompute)

    def title(self) -> str:
        """How tables name this shape."""
        dtype = "bf16 autocast" if self.amp == "bf16" else "fp32"
        return (f"D={self.dim}, depth {self.depth} ({self.depth + 1} block calls), batch {self.batch}, "
                f"seq {self.maze**2}, {dtype}")


class TrainingRun:
    """A TRM, one activation-memory method and AdamW, stepping through a fixed pool of maze batches.

    Every run of one workload starts from the same weights and sees the same batches in the same order.
    """

    def __init__(self, workload: Workload, spec: MethodSpec, pool: int = 8) -> None:
        torch.manual_seed(workload.seed)
        self.workload = workload
        self.model = wrap_blocks(TRM(workload.trm_config(spec.checkpoint, spec.coded_recompute)).to(workload.device),
                                 spec)
        self.method = None if spec.name is None else laser.methods.build(spec.name, self.model, **spec.options)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        inputs, targets = generate(workload.batch * pool, size=workload.maze, seed=workload.seed)
        inputs = torch.from_numpy(inputs).to(workload.device).split(workload.batch)
        targets = torch.from_numpy(targets).to(workload.device).split(workload.batch)
        self.batches = list(zip(inputs, targets, strict=True))
        self.steps = 0

    def forward(self) -> torch.Tensor:
        """The loss of the next batch, computed with the method's hooks active."""
        inputs, targets = self.batches[self.steps % len(self.batches)]
        hooks = self.method if self.method is not None else nullcontext()
        autocast = torch.autocast(self.workload.device, dtype=torch.bfloat16, enabled=self.workload.amp == "bf16")
        with hooks, autocast:
            return self.model.loss(self.model(inputs), targets)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward, the method's basis update, the optimizer step."""
        loss.backward()
        if self.method is not None:
            self.method.step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def step(self) -> None:
        """One whole training step."""
        self.backward(self.forward())

    def report(self) -> Report:
        """The method's report of the last step (empty for the bare model)."""
        return self.method.report() if self.method is not None else Report()

    def seconds(self) -> float:
        """Wall seconds the method has spent encoding, decoding and updating so far."""
        return sum(self.method.seconds.values()) if self.method is not None else 0.0


def ranks_reached(report: Report) -> str:
    """The range of ranks the sites were compressed at (``"64"``, ``"64-72"``), or a dash."""
    ranks = sorted({s.rank for s in report.sites if s.rank < s.dim})
    if not ranks:
        return "-"
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


# ----------------------------------------------------------------------------- memory


def _proc_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def memory_in_use(device: str) -> int:
    """Bytes in use now: allocated tensor bytes on a GPU, resident set size on a CPU."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    rss = _proc_status("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(device: str) -> bool:
    """Start a new peak-memory window; False when the platform cannot (the peak then covers the process)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return False
    return True


def peak_memory(device: str) -> int:
    """Peak bytes since :func:`reset_peak`: max allocated on a GPU, peak RSS on a CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    peak = _proc_status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def held_after_forward(run: TrainingRun) -> tuple[torch.Tensor, int]:
    """Run the forward; return the loss and the bytes it allocated that are still alive for backward."""
    if run.workload.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = run.forward()
        torch.cuda.synchronize()
        return loss, torch.cuda.memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = run.forward()
    # Each event's self memory is its allocations minus its frees, so the sum is what stayed alive.
    return loss, sum(event.self_cpu_memory_usage for event in prof.events())


def probe_memory(workload: Workload, spec: MethodSpec, warmup: int) -> dict:
    """Memory of one method after ``warmup`` steps: held after forward, peak and rise over one more step.

    Only this method's model should be alive in the process (fresh process on a CPU).
    """
    run = TrainingRun(workload, spec)
    for _ in range(warmup):
        run.step()
    gc.collect()
    before = memory_in_use(workload.device)
    windowed = reset_peak(workload.device)
    run.step()
    peak = peak_memory(workload.device)
    report = run.report()
    # Last: the profiler's event records stay in the process heap and would inflate a later RSS.
    loss, held = held_after_forward(run)
    run.backward(loss)
    stored, raw = (report.stored_bytes, report.raw_bytes) if run.method is not None else (None, None)
    return {"held": held, "peak": peak, "rise": peak - before if windowed else None, "stored": stored, "raw": raw,
            "recomputed": report.recomputed_totals() if report.recomputed else None}


def fresh_process(script: Path | str, args: Sequence[str], timeout: float | None = None) -> dict:
    """Run ``python script *args`` in a fresh interpreter and return the JSON of its ``RESULT`` line.

    With ``timeout`` (seconds) a slower process is killed and ``subprocess.TimeoutExpired`` raised.
    """
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if not lines:
        raise RuntimeError(f"{script} printed no {RESULT.strip()} line:\n{proc.stdout[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def probe_memory_fresh(workload: Workload, spec: MethodSpec, warmup: int, timeout: float | None = None) -> dict:
    """:func:`probe_memory` in a fresh process running this file with the current thread count."""
    request = {"workload": asdict(workload), "spec": asdict(spec), "warmup": warmup,
               "threads": torch.get_num_threads()}
    return fresh_process(HERE / "common.py", ["--probe", json.dumps(request)], timeout)


def compile_preflight(workload: Workload, spec: MethodSpec, timeout: float) -> str | None:
    """Why a ``compile`` variant cannot be measured here, or None when it can.

    Runs one warm-up step and the memory probe in a fresh process within ``timeout`` seconds: inductor on a
    CPU needs a working C++ compiler, and a first compile can take minutes on a loaded machine. A success
    leaves the compiled graphs in inductor's on-disk cache, so the runs after it compile much faster.
    """
    if spec.recompute != "compile":
        return None
    started = time.perf_counter()
    try:
        probe_memory_fresh(workload, spec, 1, timeout)
    except subprocess.TimeoutExpired:
        return f"torch.compile took longer than {timeout:g} s (--compile-timeout)"
    except RuntimeError as error:
        last = [line for line in str(error).splitlines() if line.strip()][-1:] or ["unknown error"]
        return f"torch.compile failed: {last[0][:200]}"
    if time.perf_counter() - started > timeout:
        return f"torch.compile took longer than {timeout:g} s (--compile-timeout)"
    return None


def main() -> None:
    """Fresh-process entry point: ``--probe JSON`` prints one RESULT line."""
    parser = argparse.ArgumentParser(description="Fresh-process memory probe used by the benchmark scripts.")
    parser.add_argument("--probe", required=True, help="JSON: workload, spec, warmup, threads")
    request = json.loads(parser.parse_args().probe)
    set_threads(request["threads"])
    result = probe_memory(Workload(**request["workload"]), MethodSpec(**request["spec"]), request["warmup"])
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
