"""Saved bytes, peak memory and step time of LASER against no compression, measured in one run.

Two models:
* ``trm``: the paper's looped block at its shape (D=512, SwiGLU 1536, 8 heads, seq 121, 24 recursion
  steps) at a CPU-sized batch, freshly initialised (untrained activations are far from low rank, so this
  is the hard case for the guarded policy);
* ``lowrank``: a looped linear residual block (D=512, rank-16 update) fed rank-16 inputs, whose saved
  activations have rank <= 32: the easy case, showing the floor.

For each model and method (none; laser rank 128 with policy paper / guarded, each with and without int8
codes; guarded with a basis per recursion position, ``bases="position"``) it prints: saved-activation bytes
(unique storages, from the method's report), their ratio to ``none``, peak RSS of a fresh process running the
same steps (and its ratio), and the median step time as a ratio to ``none`` measured in this process, methods
interleaved.

    python benchmarks/compressor.py                 # both models, batch 2, 1 thread
    python benchmarks/compressor.py --model lowrank --batch 8 --steps 5 --threads 2
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

import laser
from common import (
    RESULT,
    environment,
    fresh_process,
    interleaved_medians,
    markdown_table,
    peak_memory,
    set_threads,
)
from laser.models.trm import TRM, preset
from laser.report import format_bytes

METHODS: dict[str, dict] = {
    "none": {},
    "laser-paper": {"rank": 128, "policy": "paper"},
    "laser-paper-int8": {"rank": 128, "policy": "paper", "quantize": "int8"},
    "laser-guarded": {"rank": 128, "policy": "guarded"},
    "laser-guarded-int8": {"rank": 128, "policy": "guarded", "quantize": "int8"},
    "laser-guarded-position": {"rank": 128, "policy": "guarded", "bases": "position"},
}


class LowRankLoop(nn.Module):
    """``h <- h + (h A) B`` for ``steps`` steps: activations stay in a span of rank <= 2 * ``rank``."""

    def __init__(self, dim: int = 512, rank: int = 16, steps: int = 24) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.normal_(self.up.weight, std=0.05)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range(self.steps):
            h = h + self.up(torch.tanh(self.down(h)))
        return h


def make(model_name: str, batch: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, callable]:
    """Model, one input batch and the loss function of a benchmark model."""
    torch.manual_seed(seed)
    if model_name == "trm":
        cfg = preset("paper")
        model = TRM(cfg)
        inputs = torch.randint(0, cfg.vocab, (batch, cfg.seq_len))
        return model, inputs, lambda out: out.float().square().mean()
    model = LowRankLoop()
    basis = torch.randn(16, 512)
    inputs = torch.randn(batch, 121, 16) @ basis / 4
    return model, inputs, lambda out: out.square().mean()


def build(name: str, model: nn.Module) -> laser.ActivationMethod:
    options = dict(METHODS[name], min_numel=1024)
    return laser.methods.build("none" if name == "none" else "laser", model, **options)


def train_step(model: nn.Module, method: laser.ActivationMethod, inputs: torch.Tensor, loss_fn) -> None:
    with method:
        loss = loss_fn(model(inputs))
    loss.backward()
    method.step()
    model.zero_grad(set_to_none=True)


def child(model_name: str, method_name: str, batch: int, steps: int) -> None:
    """Run in a fresh process: ``steps`` steps, then print peak RSS and the saved bytes as JSON."""
    model, inputs, loss_fn = make(model_name, batch)
    method = build(method_name, model)
    for _ in range(steps):
        train_step(model, method, inputs, loss_fn)
    report = method.report()
    peak = peak_memory("cpu")  # VmHWM of this process (ru_maxrss would include the forking parent)
    print(RESULT + json.dumps({"peak_rss": peak, "stored": report.stored_bytes, "raw": report.raw_bytes}))


def timed(model_name: str, batch: int, steps: int) -> dict[str, float]:
    """Median step time per method, methods interleaved so drift hits all alike."""
    runs = {}
    for name in METHODS:
        model, inputs, loss_fn = make(model_name, batch)
        method = build(name, model)
        train_step(model, method, inputs, loss_fn)  # warm-up and basis initialisation
        runs[name] = (model, method, inputs, loss_fn)
    steps_by_name = {name: (lambda run=run: train_step(*run)) for name, run in runs.items()}
    return interleaved_medians(steps_by_name, steps)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["trm", "lowrank", "both"], default="both")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method")
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")
    parser.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.child:
        child(args.model, args.child, args.batch, args.steps)
        return
    for model_name in ["trm", "lowrank"] if args.model == "both" else [args.model]:
        step_time = timed(model_name, args.batch, args.steps)
        common_args = ["--model", model_name, "--batch", str(args.batch), "--steps", "2",
                       "--threads", str(args.threads)]
        memory = {name: fresh_process(__file__, ["--child", name, *common_args]) for name in METHODS}
        base = memory["none"]
        print(f"\n### {model_name}: batch {args.batch}, {args.steps} timed steps\n\n{environment('cpu')}\n")
        rows = [[name, format_bytes(m["stored"]), f"{m['stored'] / base['stored']:.3f}",
                 format_bytes(m["peak_rss"]), f"{m['peak_rss'] / base['peak_rss']:.3f}",
                 f"{step_time[name] / step_time['none']:.3f}"]
                for name, m in memory.items()]
        print(markdown_table(["method", "saved bytes", "vs none", "peak RSS (fresh process)", "vs none",
                              "step time vs none"], rows))


if __name__ == "__main__":
    main()
