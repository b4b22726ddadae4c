"""Peak RSS of short training runs, each in a fresh process, with and without the trainer's gradient probes.

``laser compare``'s "process peak" column is the whole run's peak, which includes the gradient probes
(``grad_probe_at``: the exact gradient and the method's on two validation batches; with ``grad_probe_sites``
one more forward and backward per coded site); its "peak step memory" is the training steps' own (the peak
reset before each step). This shows both with and without the probes:

    python benchmarks/trainer_peak.py --steps 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import environment, markdown_table, size

VARIANTS = {
    "none, no probes": ["method=none", "grad_probe_at=[]"],
    "laser, no probes": ["method=laser", "grad_probe_at=[]"],
    "none, probes": ["method=none"],
    "laser, model probe only": ["method=laser", "grad_probe_sites=false"],
    "laser, probes (the comparison's setting)": ["method=laser"],
}


def child(preset: str, overrides: list[str]) -> None:
    """Train in this process and print its peak memory and saved bytes as JSON."""
    import torch

    from laser.train import Trainer, apply_overrides, train_preset

    torch.set_num_threads(1)
    result = Trainer(apply_overrides(train_preset(preset), ["progress=false", *overrides])).train()
    print(json.dumps({"peak": result["peak_memory_bytes"], "step_peak": result["peak_step_memory_bytes"],
                      "saved": result["activation_bytes"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.preset, args.child)
        return
    steps = [f"max_steps={args.steps}", f"eval_every={args.steps}", f"warmup={max(1, args.steps // 5)}"]
    rows = []
    for name, overrides in VARIANTS.items():
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--child", *steps, *overrides],
                             check=True, capture_output=True, text=True).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        step_peak = "-" if measured["step_peak"] is None else size(measured["step_peak"])
        rows.append([name, step_peak, size(measured["peak"]), size(measured["saved"])])
    print(f"## Peak RSS of {args.steps}-step {args.preset} runs, one fresh process each\n\n{environment('cpu')}\n")
    print(markdown_table(["run", "peak RSS of the steps", "peak RSS of the process", "saved activations (last step)"],
                         rows))


if __name__ == "__main__":
    main()
