"""One training run in a fresh process: ``python -m laser.train.worker CONFIG.json RESULT.json [THREADS] [--resume]``.

A fresh process is what makes the CPU peak memory (peak RSS over the life of the process) belong to one run
only; :func:`laser.train.compare.compare` starts one worker per (method, seed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from laser.train import distributed
from laser.train.config import config_from_dict
from laser.train.trainer import Trainer, write_json


def run(config_path: str | Path, result_path: str | Path, threads: int = 0, resume: bool = False) -> dict:
    """Train the config saved at ``config_path`` and write the result dict to ``result_path``.

    ``threads`` > 0 sets torch's intra-op threads (several workers sharing a machine should not oversubscribe it);
    ``resume`` continues from the checkpoint in the config's ``out_dir``.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    cfg = config_from_dict(json.loads(Path(config_path).read_text()))
    trainer = Trainer(cfg, resume=resume)
    if resume:
        print(f"resumed at step {trainer.step} of {trainer.total_steps}", flush=True)
    try:
        result = trainer.train()
    finally:
        distributed.teardown()
    result["threads"] = torch.get_num_threads()
    if trainer.parallel.is_main:
        write_json(result_path, result)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``CONFIG.json RESULT.json [THREADS] [--resume]``."""
    args = sys.argv[1:] if argv is None else argv
    resume = "--resume" in args
    args = [a for a in args if a != "--resume"]
    if len(args) not in (2, 3):
        print("usage: python -m laser.train.worker CONFIG.json RESULT.json [THREADS] [--resume]", file=sys.stderr)
        return 2
    run(args[0], args[1], int(args[2]) if len(args) == 3 else 0, resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
