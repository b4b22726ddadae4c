"""How close LASER's stored bytes and its compression time are to their floors, on the looped TRM block.

**Bytes.** At the ranks a run reached, codes and bases cannot take less than, per site,
``sum_i N_i * k * c (+ k * 4 per tensor for int8 scales) + D * k * b`` (``N_i`` rows of each saved storage,
``c`` bytes per code: the activation's dtype, or 1 for int8; one basis per site, fp32 or the bf16 copy
bf16 codes are made with: ``b`` bytes), or the raw bytes
where that is not smaller; storages the method never admits (small, non-float, strided, masks, loss
terms) stay raw. The floor is computed from the report's ranks and the storages each site saved (recorded
by a method that only watches), next to the bytes the report measured; the gap is what fallbacks and
narrow sites cost.

The floor is one of what is *stored*: codes, scales, bases and raw storages. LASER's report also counts
its own per-step state in ``stored_bytes`` (``SiteReport.state_bytes``: the ``X^T Z`` accumulator, the
row sample and its keys, the fp32 master of a bf16 basis copy). That state is a choice of the tracking
algorithm (its size follows ``growth``, ``reset_rows`` and the rank), not part of any storage format, so
adding it to the floor would make the ratio say nothing: **stored** here is the report's
``stored_bytes - state_bytes``, compared with the floor, and the state is printed beside it in its own
**state** column (stored + state = the report's ``stored_bytes``).

**Time.** Beyond the block's own work a compressed tensor costs a projection ``Z = X Q`` (N x D x k
multiply-adds), an accumulation ``M += X^T Z`` (D x N x k) and a reconstruction ``X_hat = Z Q^T``
(N x k x D) in backward: ``6 N D k`` FLOPs. The input of a linear (D -> Dout) whose weight needs a gradient
is not reconstructed (factored weight gradients, ``LaserConfig.factored``): its weight gradient
``(dY^T Z) Q^T`` costs ``2 N Dout k`` FLOPs instead of the baseline's ``2 N Dout D``, plus ``2 Dout k D`` for
the product with ``Q^T``, which the recursion steps sharing a basis make together: twice per site, linear and
step (the first call's own, and one for all later calls: ``laser.factored.WeightGradSink``), once where the
site feeds that linear once. Its extra FLOPs are ``4 N D k + 2 N Dout (k - D)``, negative where ``k`` is
well under both widths (such a storage also read by another backward is still reconstructed once; counting
it factored keeps the floor a lower bound). Their share of the block's forward+backward FLOPs (counted
analytically, see :func:`block_flops`) is the overhead floor: at the same FLOP rate the step-time ratio
cannot be below ``1 + share``. It is printed next to the step-time ratio measured against ``none``
(median of interleaved rounds after warm-up).

**On checkpointing** (``laser-int8+checkpoint``, ``laser-s8-int8+checkpoint``) the reference is ``checkpoint``
(timed in the same rounds): the hooks see only each region's input, which the rerun reads decoded (torch's
checkpoint runs the region's linears as they are, so nothing is factored), and the block's FLOPs include the
rerun forward. The floor then says how far LASER's coding of the region inputs keeps it above checkpointing's
own time.

    python benchmarks/floor.py                              # D 256 and 512, depth 8, rank 64
    python benchmarks/floor.py --dims 512 --depths 24 --ranks 64 128 --sites
    python benchmarks/floor.py --dims 512 --depths 8 --ranks 128 --batch 8 --methods laser-int8+checkpoint
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import laser
from common import (
    MethodSpec,
    TrainingRun,
    Workload,
    environment,
    grid_parser,
    grid_workloads,
    interleaved_medians,
    markdown_table,
    method_specs,
    parse_timed,
    ranks_reached,
    size,
    synchronizer,
)
from laser.hooks import Packed, Reason
from laser.methods.laser import matmul_dtype
from laser.models.trm import TRMConfig
from laser.report import Report

LASER_VARIANTS = ["laser-paper", "laser-paper-int8", "laser-guarded", "laser-guarded-int8", "laser", "laser-int8",
                  "laser-s8", "laser-s8-int8", "laser-ref", "laser-recon", "laser-int8+checkpoint",
                  "laser-s8-int8+checkpoint"]
SCALE_BYTES = 4  # one fp32 scale per int8 code column


@dataclass
class SiteShapes:
    """The storages one site admitted during a step: rows of each, width (of the coded columns) and dtype,
    and the bytes of the whole storages (a column block, attention's value slice of a fused ``qkv``, codes
    only its own columns of each row)."""

    dim: int
    dtype: torch.dtype
    rows: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)  # per storage: Dout of the linear it feeds, or 0
    storage_bytes: int = 0

    @property
    def element_size(self) -> int:
        """Bytes per element of these storages."""
        return self.dtype.itemsize

    @property
    def raw_bytes(self) -> int:
        """Bytes these storages take raw (whole storages)."""
        return self.storage_bytes


class ShapeRecorder(laser.ActivationMethod):
    """Stores everything raw and records, per site, the rows, width and element size of each admitted storage,
    and the output width of the linear (with a weight that needs a gradient) each one feeds, if any.

    Admission is the shared plumbing's (same defaults as every method), so these are the storages LASER
    would encode. Call :meth:`resolve` after the forward, while the saved storages are alive.
    """

    name = "recorder"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, laser.NoneConfig())
        self.shapes: dict[str, SiteShapes] = {}
        self._storages: list[tuple[SiteShapes, int]] = []
        self._linear_inputs: dict[int, int] = {}  # storage address -> Dout
        self._linear_hooks = [m.register_forward_pre_hook(self._note_linear_input) for m in model.modules()
                              if isinstance(m, torch.nn.Linear)]

    def _note_linear_input(self, module: torch.nn.Linear, args: tuple) -> None:
        if module.weight.requires_grad and args and isinstance(args[0], torch.Tensor):
            self._linear_inputs[args[0].untyped_storage().data_ptr()] = module.out_features

    def encode(self, x: torch.Tensor, site: str) -> Packed | str:
        shapes = self.shapes.setdefault(site, SiteShapes(x.shape[1], x.dtype))
        shapes.rows.append(x.shape[0])
        shapes.storage_bytes += x.untyped_storage().nbytes()
        self._storages.append((shapes, x.untyped_storage().data_ptr()))
        return Reason.RAW

    def resolve(self) -> None:
        """Give each recorded storage the output width of the linear it fed (0: none), in recording order."""
        for shapes, address in self._storages:
            shapes.outputs.append(self._linear_inputs.get(address, 0))

    def remove(self) -> None:
        for handle in self._linear_hooks:
            handle.remove()
        super().remove()


def floor_bytes(rows: Sequence[int], dim: int, rank: int, element_size: int, int8: bool,
                basis_bytes: int = 4, raw: int | None = None) -> int:
    """Least bytes a site's storages (``rows[i]`` x ``dim``) take as rank-``rank`` codes plus one basis.

    Codes cost ``element_size`` bytes each (1 with int8, plus one fp32 scale per column and tensor); the
    basis is ``dim x rank`` elements of ``basis_bytes``. Where that is not smaller than the raw storages
    (``raw`` bytes; default ``rows x dim`` elements), the raw bytes (int8 codes pay even at
    ``rank == dim``, where they are a plain int8 quantization).
    """
    raw = sum(rows) * dim * element_size if raw is None else raw
    code_bytes = 1 if int8 else element_size
    scales = SCALE_BYTES * rank * len(rows) if int8 else 0
    codes = sum(rows) * rank * code_bytes + scales + dim * rank * basis_bytes
    return min(codes, raw)


def compression_flops(rows: Sequence[int], dim: int, rank: int, stride: int = 1,
                      outputs: Sequence[int] | None = None) -> int:
    """FLOPs LASER adds for storages of ``rows[i]`` x ``dim`` at ``rank``: projection, accumulation (of every
    ``stride``-th row, ``LaserConfig.accumulate_stride``) and reconstruction; for a storage that feeds a
    linear of ``outputs[i]`` > 0 output features, the factored weight gradient ``dY^T Z`` minus the
    baseline's ``dY^T X`` instead of the reconstruction (negative where the rank is small), and per linear
    the products with ``Q^T``: one per storage up to two (the first call's, then the sink's for the rest)."""
    outputs = outputs if outputs is not None else [0] * len(rows)
    total = 0
    for n, out in zip(rows, outputs, strict=True):
        accumulated = -(-n // stride) if n > stride else n
        total += 2 * (n + accumulated) * dim * rank
        total += 2 * n * out * (rank - dim) if out else 2 * n * rank * dim
    for out in set(outputs) - {0}:
        total += 2 * out * rank * dim * min(2, outputs.count(out))
    return total


def block_flops(cfg: TRMConfig, batch: int, seq: int) -> int:
    """Matmul and attention FLOPs of one TRM forward+backward (the grad cycle and the output head).

    Per block call on ``N = batch * seq`` tokens, forward: the linears ``qkv`` (D -> 3D), ``o`` (D -> D),
    ``gate_up`` (D -> 2I) and ``down`` (I -> D) take ``2 N (4 D^2 + 3 D I)``, attention ``QK^T`` and
    ``PV`` take ``4 N seq D``. Backward: twice the forward for linears (input and weight gradients),
    2.5 times for attention (flash-style: ``QK^T`` recomputed, then ``dV``, ``dP``, ``dQ``, ``dK``). A step
    with grad runs ``L_cycles + 1`` calls of ``L_layers`` blocks; the head (D -> vocab) runs once. The
    benchmarks' TRM has ``H_cycles = n_sup = 1``: no forward runs without grad. With ``cfg.checkpoint`` every
    block call's forward runs again in backward (``torch.utils.checkpoint``).
    """
    tokens = batch * seq
    d, inter = cfg.hidden, cfg.inter
    linear = 2 * tokens * (4 * d * d + 3 * d * inter)
    attention = 4 * tokens * seq * d
    calls = (cfg.L_cycles + 1) * cfg.L_layers
    head = 2 * tokens * d * cfg.vocab
    recomputed = calls * (linear + attention) if cfg.checkpoint else 0
    return calls * (3 * linear + 7 * attention // 2) + 3 * head + recomputed


def record_shapes(workload: Workload, checkpoint: bool = False) -> dict[str, SiteShapes]:
    """The storages each site admits during one forward of the workload's model (with ``checkpoint``: the
    checkpointed model's, whose regions save only their inputs through the hooks)."""
    run = TrainingRun(workload, MethodSpec("bare", None, checkpoint=checkpoint))
    recorder = ShapeRecorder(run.model)
    with recorder:
        loss = run.forward()
    recorder.resolve()
    loss.backward()
    recorder.remove()
    return recorder.shapes


def floor_rows(report: Report, shapes: dict[str, SiteShapes], int8: bool, stride: int = 1,
               matmul: str = "auto", factored: bool = True) -> list[dict]:
    """Per site: dim, tensors, rows, rank reached, raw, stored, state and floor bytes, and extra FLOPs.

    ``stored`` is what the report stored for the site without the method's own state (codes, scales, bases,
    raw storages: what the floor bounds), ``state`` that state (``SiteReport.state_bytes``). ``stride``,
    ``matmul`` and ``factored`` are the run's ``LaserConfig.accumulate_stride``, ``matmul_dtype`` and
    ``factored``.
    """
    rows = []
    for site in report.sites:
        shape = shapes.get(site.name)
        floor, flops = site.raw_bytes, 0
        if shape is not None:
            basis_bytes = matmul_dtype(shape.dtype, matmul).itemsize
            codes = floor_bytes(shape.rows, shape.dim, site.rank, shape.element_size, int8, basis_bytes,
                                shape.raw_bytes)
            floor += codes - shape.raw_bytes
            if codes < shape.raw_bytes:
                outputs = shape.outputs if factored else None
                flops = compression_flops(shape.rows, shape.dim, site.rank, stride, outputs)
        rows.append({"site": site.name, "dim": site.dim, "tensors": site.tensors,
                     "rows": sum(shape.rows) if shape is not None else 0, "rank": site.rank,
                     "raw": site.raw_bytes, "stored": site.stored_bytes - site.state_bytes,
                     "state": site.state_bytes, "floor": floor, "flops": flops})
    return rows


def measure(workload: Workload, specs: list[MethodSpec], args: argparse.Namespace) -> tuple[dict, dict, int]:
    """Step times (interleaved, with ``none``) and last-step reports of every spec, and the rounds timed."""
    runs = {spec.label: TrainingRun(workload, spec) for spec in specs}
    for run in runs.values():
        for _ in range(args.warmup):
            run.step()
    times, rounds = interleaved_medians({label: run.step for label, run in runs.items()}, args.steps,
                                        synchronizer(workload.device))
    reports = {label: run.report() for label, run in runs.items()}
    del runs
    gc.collect()
    return times, reports, rounds


def tables(workload: Workload, specs: list[MethodSpec], args: argparse.Namespace) -> str:
    """The summary table of one workload (and the per-site tables with ``--sites``)."""
    baseline, variants = specs[0], specs[1:]
    # the reference of the checkpointed variants, timed beside them
    references = [MethodSpec("checkpoint", checkpoint=True)] if any(spec.checkpoint for spec in variants) else []
    times, reports, rounds = measure(workload, [baseline, *references, *variants], args)
    shapes = {ckpt: record_shapes(workload, ckpt) for ckpt in {False, *(spec.checkpoint for spec in variants)}}
    block = {ckpt: block_flops(workload.trm_config(ckpt), workload.batch, workload.maze**2) for ckpt in shapes}
    summary, details = [], []
    for spec in variants:
        reference = (references[0] if spec.checkpoint else baseline).label
        site_rows = floor_rows(reports[spec.label], shapes[spec.checkpoint], spec.options.get("quantize") == "int8",
                               spec.options.get("accumulate_stride", 1), spec.options.get("matmul_dtype", "auto"),
                               spec.options.get("factored", True) and not spec.checkpoint)
        stored = sum(r["stored"] for r in site_rows)
        state = sum(r["state"] for r in site_rows)
        floor = sum(r["floor"] for r in site_rows)
        share = sum(r["flops"] for r in site_rows) / block[spec.checkpoint]
        measured = times[spec.label] / times[reference]
        summary.append([
            spec.label, ranks_reached(reports[spec.label]),
            size(sum(r["raw"] for r in site_rows)), size(stored), size(floor), f"{stored / floor:.3f}",
            size(state), f"{100 * share:.1f}%", reference, f"{1 + share:.3f}", f"{measured:.3f}",
            f"{(measured - 1) / share:.2f}" if share else "-",
        ])
        if args.sites:
            details.append(f"\n{spec.label}: per site\n\n" + markdown_table(
                ["site", "dim", "tensors", "rows", "rank", "raw", "stored", "floor", "state", "extra GFLOP"],
                [[r["site"], r["dim"], r["tensors"], r["rows"], r["rank"], size(r["raw"]), size(r["stored"]),
                  size(r["floor"]), size(r["state"]), f"{r['flops'] / 1e9:.3f}"] for r in site_rows]))
    headers = ["method", "ranks", "raw", "stored", "floor", "stored / floor", "state", "extra FLOPs / block",
               "vs", "time ratio floor", "time ratio measured", "measured overhead / floor"]
    flops = ", ".join(f"{block[ckpt] / 1e9:.2f} GFLOP per step{' with checkpointing' if ckpt else ''}"
                      for ckpt in sorted(block))
    timed = ", ".join(f"{spec.label} {1000 * times[spec.label]:.1f} ms" for spec in [baseline, *references])
    title = (f"### {workload.title()}\n\n{environment(workload.device)}; block forward+backward {flops}; step "
             f"times: median of {rounds} interleaved rounds after {args.warmup} warm-up steps, ratio to the "
             f"reference in `vs` ({timed}).\n")
    return f"{title}\n{markdown_table(headers, summary)}\n" + "\n".join(details)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings (see ``--help``)."""
    parser = grid_parser(__doc__, LASER_VARIANTS, LASER_VARIANTS[:4], "LASER variants")
    parser.add_argument("--sites", action="store_true", help="also print the per-site floor tables")
    return parse_timed(parser, argv)


def main(argv: list[str] | None = None) -> None:
    """Print one table per width and depth."""
    args = parse_args(argv)
    specs = method_specs(args.methods, args.ranks)
    for workload in grid_workloads(args):
        print(tables(workload, specs, args), flush=True)


if __name__ == "__main__":
    main()
