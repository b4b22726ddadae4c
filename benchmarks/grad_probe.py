"""Gradient fidelity and stored bytes of method specs on a trained run's weights.

For each method spec (``NAME[:key=value,...]``, as ``laser compare`` takes them) the method is warmed up
on ``--warmup`` validation batches (so LASER's bases are tracked, not fresh), then on ``--batches`` other
validation batches the parameter gradient with the method is compared with the exact one (same weights,
method off): cosine and relative error of the whole-model gradient, the saved bytes the method kept
against ``none``'s, and the fidelity of the sites named by ``--show``.

It answers "which sites may a method touch": e.g. whether attention heads folded into token rows
(``laser:fold_to=64``) keep gradients, on a quick-preset run:

    laser train --preset quick --out runs/quick-none
    python benchmarks/grad_probe.py runs/quick-none laser laser:fold_to=64 laser:fold_to=64,rank=60,max_rank=60

``--plan COSINE`` also runs budget mode (:func:`laser.plan`) for that gradient-cosine floor, tracked on the
warm-up batches and measured on the others, prints what it raised and protected, and adds its settings as
a spec to the table (the spec line can be passed to ``laser compare --methods`` as it is); with ``--per-tensor``
the floor holds for every parameter tensor's gradient cosine (``laser.Target(tensor_cosine=...)``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

import laser
from common import environment, markdown_table, ratio, set_threads, size
from laser import methods
from laser.analysis.analyze import build_model, load_run, task_loss, validation_batches
from laser.analysis.gradients import least_faithful, parameter_gradient
from laser.train.config import parse_method_spec


def probe(run_dir: str, specs: Sequence[str], batch: int, batches: int, warmup: int,
          show: Sequence[str]) -> list[list[object]]:
    """One table row per spec: whole-model grad cosine and relative error, the worst parameter tensor's cosine
    and the lowest fraction of a tensor's coordinates whose gradient sign is right, saved bytes, and the fidelity
    of ``show`` sites."""
    run = load_run(run_dir)
    device = torch.device("cpu")
    pool = validation_batches(run.config, batch, device)
    if len(pool) < warmup + batches:
        raise ValueError(f"--warmup {warmup} + --batches {batches} need {warmup + batches} validation batches of "
                         f"{batch}, the run has {len(pool)}: lower them or --batch")
    warm, measured = pool[:warmup], pool[warmup:warmup + batches]
    loss_fn = task_loss(run.config)
    rows = []
    baseline_bytes = None
    for text in ["none", *specs]:
        spec = parse_method_spec(text)
        model = build_model(run.config, run.weights[run.final_step], device)
        defaults = run.config.method_defaults.get(spec.name, {})
        method = methods.build(spec.name, model, **{**defaults, **spec.options})
        for b in warm:
            with method:
                loss = loss_fn(model, b)
            loss.backward()
            method.step()
        model.zero_grad(set_to_none=True)
        exact = parameter_gradient(model, measured, loss_fn)
        approx = parameter_gradient(model, measured, loss_fn, method)
        method.step()
        report = method.report()
        baseline_bytes = baseline_bytes or report.stored_bytes
        cosine = (approx @ exact / (approx.norm() * exact.norm())).item()
        worst, signs = least_faithful(approx, exact, model)
        sites = {s.name: s for s in report.sites}
        shown = [f"{sites[n].rank} / {sites[n].fidelity:.4f}" if n in sites else "-" for n in show]
        rows.append([text, f"{cosine:.4f}", f"{((approx - exact).norm() / exact.norm()).item():.4f}",
                     f"{worst.cosine:.4f} ({worst.name})", f"{signs:.3f}",
                     size(report.stored_bytes), ratio(report.stored_bytes, baseline_bytes), *shown])
    return rows


def plan_spec(run_dir: str, cosine: float, batch: int, batches: int, warmup: int,
              per_tensor: bool = False, start: str = "laser") -> tuple[laser.Plan, str]:
    """Budget mode's plan for a gradient-cosine floor on the run's final weights, and its method spec: a floor
    on the whole-model cosine, or with ``per_tensor`` on every parameter tensor's, planned from the LASER spec
    ``start`` (its options over the run's preset defaults).

    Each probe tracks over the ``warmup`` validation batches of ``batch`` and is measured on the ``batches``
    after them, as :func:`probe` measures every spec."""
    run = load_run(run_dir)
    model = build_model(run.config, run.weights[run.final_step], torch.device("cpu"))
    pool = validation_batches(run.config, batch, torch.device("cpu"))
    warm, measured = pool[:warmup], pool[warmup:warmup + batches]
    spec = parse_method_spec(start)
    if spec.name != "laser":
        raise ValueError(f"--plan-from {start!r} is invalid: budget mode plans LASER, use a laser spec "
                         "(e.g. laser:rank=56,quantize=int8)")
    config = methods.make_config("laser", **{**run.config.method_defaults.get("laser", {}), **spec.options})
    loss_fn = task_loss(run.config)
    target = laser.Target(tensor_cosine=cosine) if per_tensor else laser.Target(grad_cosine=cosine)
    plan = laser.plan(model, lambda m: sum(loss_fn(m, b) for b in measured), target,
                      config, warmup=[lambda m, b=b: loss_fn(m, b) for b in warm])
    options = [f"{key}={value}" for key, value in spec.options.items() if key not in ("rank", "site_ranks", "exclude")]
    options.insert(0, f"rank={plan.config.rank}")
    if plan.config.site_ranks:
        options.append("site_ranks=" + ";".join(plan.config.site_ranks))
    if plan.config.exclude:
        options.append("exclude=" + ";".join(plan.config.exclude))
    return plan, "laser:" + ",".join(options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder holding checkpoint.pt (laser train --out)")
    parser.add_argument("specs", nargs="*", help="method specs, e.g. laser:rank=32,fold_to=64")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="validation batches the gradients are summed over")
    parser.add_argument("--warmup", type=int, default=4, help="method steps before measuring")
    parser.add_argument("--show", nargs="*", default=["blocks.0.attn:64", "blocks.0.attn:16", "blocks.0.mlp:512"],
                        help="sites whose rank / fidelity get a column")
    parser.add_argument("--plan", type=float, default=None, metavar="COSINE",
                        help="also plan LASER's site ranks for this gradient-cosine floor (budget mode)")
    parser.add_argument("--per-tensor", action="store_true",
                        help="--plan's floor holds for every parameter tensor's gradient, not the whole model's")
    parser.add_argument("--plan-from", default="laser", metavar="SPEC",
                        help="the LASER spec --plan starts from (default: the run's preset defaults)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    specs = list(args.specs)
    if args.plan is not None:
        plan, spec = plan_spec(args.run_dir, args.plan, args.batch, args.batches, args.warmup, args.per_tensor,
                               args.plan_from)
        print(f"## Budget mode on {args.run_dir}\n\n```\n{plan}\n```\n\nspec: `{spec}`\n")
        specs.append(spec)
    rows = probe(args.run_dir, specs, args.batch, args.batches, args.warmup, args.show)
    print(f"## Gradient fidelity on {args.run_dir}\n\n{environment('cpu')}; {args.batches} validation batches of "
          f"{args.batch} after {args.warmup} warm-up steps; method options include the run's preset defaults.\n")
    headers = ["method", "grad cosine", "grad rel. error", "worst tensor cosine", "lowest sign agreement", "saved",
               "vs none"] + [f"{s} rank / fid." for s in args.show]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
