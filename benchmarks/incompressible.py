"""Bounded cost where nothing compresses: LASER's step time on a model whose activations are full rank.

An untrained looped transformer (``nn.TransformerEncoderLayer`` applied ``--depth`` times, weight-tied) on
random tokens has activations with no low-rank structure: no site reaches the threshold at rank
``--rank``. Each site then expands, resets by SVD after ``patience`` low steps, and stops being tracked
after ``max_resets`` resets in a row (reason ``untracked``), stored raw from then on. After that warm-up
the step should cost what the saved-tensor hooks cost: the target is ``laser / none <= 1.10``
(``none``: the same hooks, nothing coded; ``bare``: no hooks at all). Step times are medians of
interleaved rounds in one process; the table also gives the reasons the report names for raw storages.

    python benchmarks/incompressible.py
    python benchmarks/incompressible.py --width 256 --depth 8 --steps 9
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch import nn

import laser
from common import add_timing_arguments, environment, interleaved_medians, markdown_table, parse_timed, set_threads


class LoopedEncoder(nn.Module):
    """One ``nn.TransformerEncoderLayer`` applied ``depth`` times to embedded tokens, then a vocabulary head."""

    def __init__(self, width: int, depth: int, vocab: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layer = nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.head = nn.Linear(width, vocab)
        self.depth = depth

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)  # (B, L, D)
        for _ in range(self.depth):
            h = self.layer(h)
        return self.head(h)  # (B, L, vocab)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    add_timing_arguments(parser, warmup=12, steps=7)
    args = parse_timed(parser, argv)
    set_threads(args.threads)
    torch.manual_seed(0)
    model = LoopedEncoder(args.width, args.depth)
    tokens = torch.randint(256, (args.batch, args.length))
    methods = {
        "bare": None,
        "none": laser.methods.build("none", model),
        "laser": laser.methods.build("laser", model, rank=args.rank),
    }

    def step(method):
        def run():
            model.zero_grad(set_to_none=True)
            with method if method is not None else torch.enable_grad():
                loss = model(tokens).logsumexp(-1).mean()
            loss.backward()
            if method is not None:
                method.step()
        return run

    steps = {name: step(method) for name, method in methods.items()}
    for _ in range(args.warmup):
        for run in steps.values():
            run()
    times, rounds = interleaved_medians(steps, args.steps)
    rows = []
    for name, method in methods.items():
        reasons = Counter()
        if method is not None:
            for site in method.report().sites:
                reasons.update(site.reasons)
        saved = f"{100 * method.report().savings:.1f}%" if method is not None else "-"
        rows.append([name, f"{1000 * times[name]:.1f}", f"{times[name] / times['none']:.3f}", saved,
                     ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "-"])
    print(f"looped TransformerEncoderLayer, width {args.width}, depth {args.depth}, batch {args.batch} x "
          f"{args.length} tokens, rank {args.rank}; {args.warmup} warm-up steps, medians of {rounds} rounds")
    print(environment("cpu"))
    print(markdown_table(["method", "step ms", "vs none", "saved", "kept raw because"], rows))


if __name__ == "__main__":
    main()
