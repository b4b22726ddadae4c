"""The ``laser`` command: ``laser train`` and ``laser compare`` (more subcommands register in ``COMMANDS``).

    laser train --preset quick --method laser:rank=32 --set lr=3e-4 --out runs/mine
    laser train --preset quick --out runs/mine --resume
    torchrun --standalone --nproc_per_node 2 -m laser.cli train --preset quick --method laser --out runs/ddp
    laser compare --preset quick --methods none,laser,laser:quantize=int8 --seeds 2
    laser train --task text --method laser --out runs/text      # the looped byte LM (preset text-quick)
    laser compare --task text --methods none,laser,oracle --seeds 2

A subcommand is one entry of ``COMMANDS``: name -> (add_arguments(parser), run(args) -> exit code). A setting
that does not exist or a value that is not allowed stops the command at once with exit code 2 and the list
of valid values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from laser.train.config import (
    PRESETS,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    parse_method_spec,
    presets_of,
    train_preset,
    with_method,
)
from laser.train.tasks import TASKS

# The preset a task runs when --preset is not given (the maze's only for ``laser compare``, as before).
TASK_PRESETS = {"maze": "quick", "text": "text-quick"}


class UsageError(ValueError):
    """A bad command line: reported by argparse with exit code 2."""


def _resolve(preset: str, method: str | None, sets: list[str]) -> TrainConfig:
    """The preset with the method spec and ``--set`` overrides applied; any ValueError becomes a UsageError."""
    try:
        cfg = train_preset(preset)
        if method is not None:
            cfg = with_method(cfg, parse_method_spec(method))
        return apply_overrides(cfg, sets)
    except ValueError as err:
        raise UsageError(str(err)) from err


def choose_preset(preset: str | None, task: str | None, default: str | None) -> str:
    """The preset a command runs: ``--preset``, else the task's default preset, else ``default``; a preset of
    another task than ``--task`` is a UsageError."""
    if preset is None:
        preset = TASK_PRESETS[task] if task is not None else default
    if preset is None:
        raise UsageError("--preset is required (or --task, which picks its quick preset); presets: "
                         + ", ".join(PRESETS))
    if task is not None and preset not in presets_of(task):
        raise UsageError(f"--preset {preset} is not a preset of --task {task}; its presets: "
                         f"{', '.join(presets_of(task))}")
    return preset


def _add_common(parser: argparse.ArgumentParser, default_preset: str | None) -> None:
    defaults = ", ".join(f"{task}: {preset}" for task, preset in TASK_PRESETS.items())
    parser.add_argument("--task", choices=list(TASKS), default=None,
                        help="maze (TRM on mazes) or text (looped byte LM on the Python stdlib's source); picks "
                             f"its preset when --preset is not given ({defaults})")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="training preset" + (f" (default: {default_preset})" if default_preset else ""))
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. model.hidden=64, lr=3e-4, method.rank=64 (repeatable)")
    parser.add_argument("--out", default=None, help="output folder")


# ----------------------------------------------------------------------------------------------- train
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``laser train``."""
    _add_common(parser, default_preset=None)
    parser.add_argument("--method", default=None,
                        help="method spec: NAME[:key=value,...][+checkpoint], e.g. laser:rank=64,quantize=int8")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def run_train(args: argparse.Namespace) -> int:
    """Train one model and print its final metrics (under torchrun: data-parallel, rank 0 prints)."""
    from laser.train import distributed
    from laser.train.trainer import CHECKPOINT_NAME, CheckpointError, Trainer

    args.preset = choose_preset(args.preset, args.task, None)
    cfg = _resolve(args.preset, args.method, args.sets)
    try:
        main_process = distributed.env_world()[0] == 0
    except ValueError as err:
        raise UsageError(str(err)) from err

    def say(text: object) -> None:
        if main_process:
            print(text)

    label = args.method or cfg.method
    out = Path(args.out or cfg.out_dir or f"runs/{args.preset}-{label}".replace(":", "_").replace(",", "_"))
    if (out / CHECKPOINT_NAME).exists() and not args.resume:
        raise UsageError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    if args.resume and not (out / CHECKPOINT_NAME).exists():
        say(f"no checkpoint in {out}; starting a new run")
    cfg = dataclasses.replace(cfg, out_dir=str(out))
    say("resolved config: " + json.dumps(config_to_dict(cfg)))
    try:
        trainer = Trainer(cfg, resume=args.resume)
    except CheckpointError:
        raise
    except ValueError as err:  # a setting that does not fit this launch (batch vs world size, device)
        raise UsageError(str(err)) from err
    try:
        if trainer.parallel.world > 1:
            say(f"{trainer.parallel.world} processes, parallel={cfg.parallel}, {cfg.batch // trainer.parallel.world} "
                f"mazes of each global batch of {cfg.batch} per process")
        if trainer.step:
            say(f"resumed at step {trainer.step} of {trainer.total_steps}")
        result = trainer.train()
    finally:
        distributed.teardown()
    seconds = result["method_seconds"]
    say(f"{label}: {trainer.task.final_line(result)}, saved activations {result['activation_bytes']} B "
        f"of {result['raw_activation_bytes']} B, median step {result['median_step_seconds']:.3f} s; {out}")
    say(f"method time over {result['steps']} steps: encode {seconds['encode']:.3f} s, "
        f"decode {seconds['decode']:.3f} s, update {seconds['update']:.3f} s (update includes the cross-process sync)")
    say(trainer.method.report())
    return 0


# --------------------------------------------------------------------------------------------- compare
def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``laser compare``."""
    from laser.train.compare import DEFAULT_METHODS

    _add_common(parser, default_preset="quick")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="method specs separated by commas (an option list after ':' may use commas too), "
                             "default: %(default)s")
    parser.add_argument("--seeds", type=int, default=2, help="how many of the seeds 100-104 (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs in --out that finished with the same settings and continue those "
                             "interrupted with them from their last checkpoint")
    parser.add_argument("--jobs", type=int, default=0,
                        help="runs trained at once (default: one per CPU core, one on a GPU)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (default: the CPU cores divided among the jobs)")


def split_methods(text: str) -> list[str]:
    """Split ``none,laser:rank=64,quantize=int8,quant:bits=2`` into method specs.

    A comma starts a new spec unless what follows is ``key=value`` (an option of the spec before).
    """
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name = part.split("+")[0]
        if specs and ":" in specs[-1].split("+")[0] and "=" in name and ":" not in name:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def run_compare(args: argparse.Namespace) -> int:
    """Compare activation-memory methods over seeds and write report.md and results.json."""
    from laser.train import distributed
    from laser.train.compare import compare

    if distributed.env_world()[1] > 1:
        raise UsageError("laser compare starts one process per (method, seed) itself; run it without torchrun")
    args.preset = choose_preset(args.preset, args.task, "quick")
    cfg = _resolve(args.preset, None, args.sets)
    try:
        specs = [parse_method_spec(s) for s in split_methods(args.methods)]
    except ValueError as err:
        raise UsageError(str(err)) from err
    if not specs:
        raise UsageError("--methods is empty; give at least one method spec, e.g. none,laser")
    if args.seeds < 1 or args.jobs < 0 or args.threads < 0:
        raise UsageError(f"--seeds must be >= 1, --jobs and --threads >= 0; got {args.seeds}, {args.jobs} and "
                         f"{args.threads}")
    out = args.out or f"runs/{args.preset}-compare"
    compare(cfg, specs, seeds=args.seeds, out_dir=out, jobs=args.jobs, threads=args.threads, preset=args.preset,
            resume=args.resume)
    return 0


def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``laser analyze`` (imported lazily: matplotlib and the trainer are heavy)."""
    from laser.analysis import analyze

    analyze.add_arguments(parser)


def _analyze_run(args: argparse.Namespace) -> int:
    """Analyse a training run: spectra, linearity, statistics, gradient fidelity, depth; writes analysis.md."""
    from laser.analysis import analyze

    return analyze.run(args)


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": (add_train_arguments, run_train),
    "compare": (add_compare_arguments, run_compare),
    "analyze": (_analyze_arguments, _analyze_run),
}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the subcommand; bad settings exit with code 2."""
    parser = argparse.ArgumentParser(prog="laser", description="Low-rank activation compression experiments.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=(run.__doc__ or "").split("\n")[0], description=run.__doc__)
        add_arguments(sub)
        sub.set_defaults(run=run, parser=sub)
    args = parser.parse_args(argv)
    from laser.train.trainer import CheckpointError

    try:
        return args.run(args)
    except UsageError as err:
        args.parser.error(str(err))  # exits with code 2
    except CheckpointError as err:
        print(f"laser {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
