"""Gradient fidelity of coding attention's query and key: why ``SiteFilter.exact_qk`` is on by default.

``scaled_dot_product_attention`` saves q, k, v, its output and the softmax normaliser (logsumexp); its
backward recomputes the probabilities ``exp(q k^T - lse)`` from the saved q and k against that exact
normaliser, so an error in ``q k^T`` is amplified. On an untrained TRM (width ``--dim``, ``--dim / 64``
heads, ``--depth`` recursion steps, 11x11 mazes) this prints, after ``--warmup`` steps without an
optimizer, the whole-model gradient cosine against the exact gradient and the saved share of bytes, for
LASER with q and k exact (the default) and coded, and the cosine with each coded site compressed alone.

    python benchmarks/attention.py
    python benchmarks/attention.py --dim 256 --rank 64
"""

from __future__ import annotations

import argparse
import re

import torch

import laser
from common import environment, markdown_table, set_threads
from laser.data.maze import generate
from laser.models.trm import TRM, TRMConfig


def gradient(model, inputs, targets, method=None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    if method is None:
        loss = model.loss(model(inputs), targets)
    else:
        with method:
            loss = model.loss(model(inputs), targets)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def probe(model, inputs, targets, exact, warmup, **options) -> tuple[float, laser.Report]:
    """Gradient cosine and report of LASER with ``options`` after ``warmup`` steps."""
    comp = laser.Compressor(model, laser.LaserConfig(**options))
    try:
        for _ in range(warmup):
            grad = gradient(model, inputs, targets, comp)
            report = comp.report()
            comp.step()
    finally:
        comp.remove()
    return float(torch.nn.functional.cosine_similarity(grad, exact, dim=0)), report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(0)
    model = TRM(TRMConfig(hidden=args.dim, heads=max(1, args.dim // 64), L_cycles=args.depth, seq_len=121))
    inputs, targets = (torch.from_numpy(a) for a in generate(args.batch, size=11, seed=0))
    exact = gradient(model, inputs, targets)
    rows = []
    for exact_qk in (True, False):
        cosine, report = probe(model, inputs, targets, exact, args.warmup, rank=args.rank, exact_qk=exact_qk)
        saved = f"{100 * report.savings:.1f}%"
        rows.append([f"laser r{args.rank}, exact_qk={exact_qk}", "all", f"{cosine:.4f}", saved])
    coded = [s.name for s in report.sites if s.fallbacks < s.tensors]
    for site in coded:
        pattern = re.sub(r"([*?\[])", r"[\1]", site)
        cosine, single = probe(model, inputs, targets, exact, args.warmup, rank=args.rank, exact_qk=False,
                               include=(pattern,))
        rows.append([f"laser r{args.rank}, only this site", site, f"{cosine:.4f}",
                     f"fidelity {single.site(site).fidelity:.4f}"])
    print(f"untrained TRM D={args.dim}, depth {args.depth}, batch {args.batch}, 11x11 mazes; gradient after "
          f"{args.warmup} steps (no optimizer)")
    print(environment("cpu"))
    print(markdown_table(["method", "sites coded", "gradient cosine", "saved / site fidelity"], rows))


if __name__ == "__main__":
    main()
