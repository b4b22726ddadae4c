"""Which mazes a trained maze run solves, by path length, at its own recursion depth and at others.

A recipe that does not converge can fail in two ways: it never learns the rule, or it learns a rule that only
reaches so far. The solve rate of the validation mazes in bands of path length (PATH cells) tells them apart,
and evaluating the same weights with more latent updates (``model.L_cycles``) or more supervision steps
(``model.n_sup``) than they trained with tells whether the rule it learned iterates (a weight-tied block whose
solve rate on long paths rises with depth) or is a fixed-depth look-up (no gain, or a loss).

    laser train --preset quick --set data.size=11 --out runs/m11
    python benchmarks/maze_depth.py runs/m11 --depths 12x1 24x1 12x2

Each depth is ``L_CYCLESxN_SUP``; the run's own comes first.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from common import markdown_table, set_threads
from laser.analysis.analyze import build_model, load_run, validation_data
from laser.data import maze
from laser.train.trainer import token_accuracy

BANDS = (0, 5, 10, 20, 30)  # lower edges of the path-length bands (PATH cells)


def parse_depth(text: str) -> tuple[int, int]:
    """``"12x2"`` as ``(L_cycles, n_sup)``; ValueError naming the expected form."""
    try:
        cycles, sup = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--depths entry {text!r} is invalid: use L_CYCLESxN_SUP, e.g. 12x1") from None
    if cycles < 1 or sup < 1:
        raise ValueError(f"--depths entry {text!r} is invalid: L_cycles and n_sup must be >= 1")
    return cycles, sup


def bands_of(targets: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(label, mask)`` per path-length band of :data:`BANDS` that holds mazes; the last one is open-ended."""
    lengths = (targets == maze.PATH).sum(dim=1)
    edges = [*BANDS, int(lengths.max()) + 1]
    bands = [(f"{low}-{high - 1}", (lengths >= low) & (lengths < high))
             for low, high in zip(edges[:-1], edges[1:], strict=True)]
    return [(label, mask) for label, mask in bands if mask.any()]


def evaluate(run_dir: str, depths: Sequence[tuple[int, int]], batch: int = 128) -> tuple[int, list[str], list[list]]:
    """The run's final step, the table's header, and one row per depth (the run's own first): token
    accuracy, solve rate and the solve rate per path-length band."""
    run = load_run(run_dir)
    if run.config.task != "maze":
        raise ValueError(f"{run_dir} trained the {run.config.task!r} task; maze_depth.py reads maze runs")
    own = (run.config.model.L_cycles, run.config.model.n_sup)
    data = validation_data(run.config, torch.device("cpu"))
    inputs, targets = data.val_inputs, data.val_targets
    bands = bands_of(targets)
    rows = []
    for cycles, sup in dict.fromkeys([own, *depths]):
        model = build_model(run.config, run.weights[run.final_step], torch.device("cpu"), L_cycles=cycles,
                            n_sup=sup).eval()
        with torch.no_grad():
            predictions = torch.cat([model(inputs[i : i + batch]).argmax(-1) for i in range(0, len(inputs), batch)])
        solved = (predictions == targets).all(dim=1).float()
        rows.append([f"{cycles}x{sup}" + (" (trained)" if (cycles, sup) == own else ""),
                     f"{100 * token_accuracy(predictions, targets):.2f}%",
                     f"{100 * float(solved.mean()):.1f}%",
                     *(f"{100 * float(solved[mask].mean()):.1f}%" for _, mask in bands)])
    header = ["L_cycles x n_sup", "val token acc", "val solve rate",
              *(f"path {label} ({int(mask.sum())})" for label, mask in bands)]
    return run.final_step, header, rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a `laser train --out` folder of a maze run")
    parser.add_argument("--depths", nargs="*", default=[], help="L_CYCLESxN_SUP to evaluate besides the run's own")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        depths = [parse_depth(d) for d in args.depths]
    except ValueError as err:
        parser.error(str(err))
    set_threads(args.threads)
    step, header, rows = evaluate(args.run, depths)
    print(f"{args.run} at step {step}: validation solve rate by path length (PATH cells; mazes in brackets)\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
