"""Gradient fidelity (paper section 3.5.2, Theorem 1 and Corollary 1), measured on a model.

Theorem 1 bounds the gradient error of backward run at reconstructed activations by the reconstruction
error: ``||g~ - g|| <= L_J ||lambda|| eps``. Here both sides are measured: the parameter gradient with
exact activations against the one with LASER's reconstructions, for the whole model and with one site
compressed at a time (the method option ``include=(site,)``), next to that site's reconstruction error
``||X - X_hat||_F / ||X||_F`` over everything it saved.

LASER's first step stores raw while it initialises its bases, so every measurement follows ``warmup``
training-free steps (forward, backward, ``step()``) that leave the model's weights untouched.

>>> result = gradient_fidelity(model, batches, loss_fn, rank=64)          # doctest: +SKIP
>>> result.model_cosine, [(s.site, s.relative_error, s.cosine) for s in result.sites]
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from laser.hooks import Packed
from laser.methods import make_config
from laser.methods.laser import Compressor
from laser.report import Report

LossFn = Callable[[nn.Module, object], Tensor]


class MeasuredCompressor(Compressor):
    """The LASER compressor, also summing ``||X - X_hat||^2`` and ``||X||^2`` per site over the step.

    ``X_hat`` is what backward will see: the decoded record (int8 codes included), or ``X`` itself for a
    tensor kept raw. Decoding once more per tensor is the price of measuring it exactly.
    """

    def __init__(self, model: nn.Module, **options: object) -> None:
        super().__init__(model, make_config("laser", **options))
        self.errors: dict[str, list[float]] = {}  # site -> [||X - X_hat||^2, ||X||^2]

    def encode(self, x: Tensor, site: str) -> Packed | str:
        """Encode as LASER does and add the reconstruction error of ``x`` ``(N, D)`` to its site."""
        record = super().encode(x, site)
        xf = x.double()
        error = 0.0
        if isinstance(record, Packed):  # else a Reason: kept raw, seen exactly
            error = (xf - record.decode().view(x.shape).double()).square().sum().item()
        sums = self.errors.setdefault(site, [0.0, 0.0])
        sums[0] += error
        sums[1] += xf.square().sum().item()
        return record

    def relative_error(self, site: str | None = None) -> float:
        """``||X - X_hat|| / ||X||`` at ``site`` (``None``: over every site) since the errors were cleared."""
        rows = self.errors.values() if site is None else [self.errors.get(site, [0.0, 0.0])]
        error, energy = sum(r[0] for r in rows), sum(r[1] for r in rows)
        return math.sqrt(error / energy) if energy > 0 else 0.0


def parameter_gradient(model: nn.Module, batches: Sequence[object], loss_fn: LossFn,
                       method: Compressor | None = None) -> Tensor:
    """Flat fp64 gradient of ``sum(loss_fn(model, b) for b in batches)`` over the trainable parameters.

    With ``method``, every forward runs inside ``with method:``. ``.grad`` fields are not touched.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: there is no gradient to compare")
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=params[0].device)
    for batch in batches:
        with torch.enable_grad():
            if method is None:
                loss = loss_fn(model, batch)
            else:
                with method:
                    loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        total += torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                            for g, p in zip(grads, params, strict=True)])
    return total


@dataclass(frozen=True)
class TensorGradient:
    """How one parameter tensor's gradient under a method compares with the exact one.

    The whole-model cosine is dominated by the tensors with the largest gradients; an optimizer that scales each
    coordinate by its own history (Adam) follows every tensor alike, and early on mostly the signs.

    Attributes:
        name: the parameter's name.
        cosine: cosine between its exact and approximate gradients.
        sign_agreement: fraction of its coordinates whose gradient has the exact gradient's sign.
    """

    name: str
    cosine: float
    sign_agreement: float


def tensor_gradients(approx: Tensor, exact: Tensor, named: Sequence[tuple[str, int]]) -> list[TensorGradient]:
    """Per-tensor comparison of two flat gradients laid out as ``named`` ``(name, numel)`` pairs in order (as
    :func:`parameter_gradient` lays out a model's trainable parameters), worst cosine first."""
    if sum(n for _, n in named) != approx.numel() or approx.shape != exact.shape:
        raise ValueError(f"gradients of {approx.numel()} and {exact.numel()} entries cannot be split into tensors of "
                         f"{sum(n for _, n in named)} entries: pass the named sizes of the parameters they were made "
                         "over (trainable_sizes(model))")
    rows, start = [], 0
    for name, numel in named:
        a, e = approx[start : start + numel], exact[start : start + numel]
        start += numel
        rows.append(TensorGradient(name, _cosine(a, e), (torch.sign(a) == torch.sign(e)).double().mean().item()))
    return sorted(rows, key=lambda row: row.cosine)


def trainable_sizes(model: nn.Module) -> list[tuple[str, int]]:
    """``(name, numel)`` of the trainable parameters in :func:`parameter_gradient`'s order."""
    return [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]


def least_faithful(approx: Tensor, exact: Tensor, model: nn.Module) -> tuple[TensorGradient, float]:
    """Of ``model``'s trainable parameters (flat gradients as :func:`parameter_gradient` makes them): the tensor
    whose gradient has the lowest cosine, and the lowest sign agreement of any tensor."""
    rows = tensor_gradients(approx, exact, trainable_sizes(model))
    return rows[0], min(row.sign_agreement for row in rows)


def _cosine(a: Tensor, b: Tensor) -> float:
    norm = (a.norm() * b.norm()).item()
    if norm == 0:
        return 1.0 if a.norm() == b.norm() else 0.0
    return (a @ b).item() / norm


def _relative(approx: Tensor, exact: Tensor) -> float:
    norm = exact.norm().item()
    return (approx - exact).norm().item() / norm if norm > 0 else 0.0


def glob_literal(name: str) -> str:
    """A glob pattern matching exactly ``name`` (``*``, ``?`` and ``[`` bracketed)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


@dataclass(frozen=True)
class SiteGradient:
    """Gradient fidelity with one site compressed.

    Attributes:
        site, dim, rank: the site, its width and the rank its codes were made with.
        fidelity: LASER's ``||Z|| / ||X||`` at the site during the measured step (before any guarded fallback).
        relative_error: ``||X - X_hat||_F / ||X||_F`` of what backward saw at the site (0 where kept raw).
        cosine: cosine between the exact parameter gradient and the one with only this site compressed.
        relative_grad_error: ``||g~ - g|| / ||g||`` of those gradients.
    """

    site: str
    dim: int
    rank: int
    fidelity: float
    relative_error: float
    cosine: float
    relative_grad_error: float


@dataclass(frozen=True)
class GradientFidelity:
    """Whole-model and per-site gradient fidelity of one measurement.

    ``model_*`` fields compress every site LASER compresses; ``report`` is that measured step's report.
    """

    model_cosine: float
    model_relative_error: float
    model_relative_grad_error: float
    sites: list[SiteGradient]
    report: Report


def warm_compressor(model: nn.Module, batches: Sequence[object], loss_fn: LossFn, warmup: int = 2,
                    **options: object) -> Compressor:
    """A LASER compressor with options ``options`` after ``warmup`` steps (forward, backward, ``step()``)
    over ``batches`` (cycled); the model's weights and ``.grad`` are untouched."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1 (LASER's first step only initialises bases), got {warmup!r}")
    if not batches:
        raise ValueError("batches is empty: pass at least one batch")
    comp = Compressor(model, make_config("laser", **options))
    for i in range(warmup):
        parameter_gradient(model, [batches[i % len(batches)]], loss_fn, comp)
        comp.step()
    return comp


def _warm_state(model: nn.Module, batches: Sequence[object], loss_fn: LossFn, warmup: int,
                **options: object) -> dict:
    comp = warm_compressor(model, batches, loss_fn, warmup, **options)
    comp.remove()
    return comp.state_dict()


def load_compressor(model: nn.Module, state: dict, **options: object) -> MeasuredCompressor:
    """A LASER compressor with options ``options`` holding the bases, ranks and counters of ``state`` (a
    compressor ``state_dict``, possibly saved with other site filters or options)."""
    comp = MeasuredCompressor(model, **options)
    comp.load_state_dict({**copy.deepcopy(state), "config": asdict(comp.config)})
    return comp


def _probe(model: nn.Module, batches: Sequence[object], loss_fn: LossFn, state: dict,
           **options: object) -> tuple[Tensor, MeasuredCompressor]:
    """The gradient with a compressor loaded with ``state`` (the config of ``options``), and the compressor."""
    probe = load_compressor(model, state, **options)
    try:
        grad = parameter_gradient(model, batches, loss_fn, probe)
        probe.step()  # freezes the measured step's report, fidelity included
    finally:
        probe.remove()
    return grad, probe


def gradient_fidelity(
    model: nn.Module,
    batches: Sequence[object],
    loss_fn: LossFn,
    sites: Sequence[str] | None = None,
    warmup_batches: Sequence[object] | None = None,
    warmup: int = 2,
    state: dict | None = None,
    **options: object,
) -> GradientFidelity:
    """Gradient cosine between exact backward and LASER's, for the whole model and one site at a time.

    A LASER compressor with ``options`` (its config fields, e.g. ``rank=64``) starts from ``state`` (a
    compressor ``state_dict``, e.g. the one a training run saved) or, without it, is warmed up for ``warmup``
    steps on ``warmup_batches`` (default: ``batches``). From that same state, the summed gradient over
    ``batches`` is measured with every site compressed and with only each of ``sites`` compressed
    (default: every site that stored codes, i.e. kept fewer storages raw than it saved, in the whole-model step).
    ``loss_fn(model, batch)`` returns a scalar loss.
    """
    if "include" in options:
        raise ValueError("include is set per site by gradient_fidelity; pass sites=[...] instead")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass at least one batch")
    if state is None:
        warm_batches = list(warmup_batches) if warmup_batches is not None else batches
        state = _warm_state(model, warm_batches, loss_fn, warmup, **options)
    exact = parameter_gradient(model, batches, loss_fn)
    whole_grad, whole = _probe(model, batches, loss_fn, state, **options)
    report = whole.report()
    if sites is None:
        sites = [row.name for row in report.sites if row.fallbacks < row.tensors]
    known = {row.name: row for row in report.sites}
    unknown = [s for s in sites if s not in known]
    if unknown:
        raise ValueError(f"sites {unknown} saved nothing in the measured step; sites: {sorted(known)}")
    rows = []
    for site in sites:
        grad, probe = _probe(model, batches, loss_fn, state, **options, include=(glob_literal(site),))
        row = probe.report().site(site)
        rows.append(SiteGradient(site, row.dim, row.rank, row.fidelity, probe.relative_error(site),
                                 _cosine(grad, exact), _relative(grad, exact)))
    return GradientFidelity(_cosine(whole_grad, exact), whole.relative_error(), _relative(whole_grad, exact),
                            rows, report)


def rank_sweep(
    model: nn.Module,
    batches: Sequence[object],
    loss_fn: LossFn,
    site: str,
    ranks: Sequence[int],
    warmup_batches: Sequence[object] | None = None,
    warmup: int = 2,
    **options: object,
) -> list[SiteGradient]:
    """Gradient fidelity with only ``site`` compressed, at each initial rank in ``ranks`` (Theorem 1's slope).

    Each rank gets its own warm-up with ``rank=k`` (``max_rank`` and ``reset_rows`` raised to ``k`` where
    smaller). Pass ``policy="paper"`` so that low ranks are really used rather than stored raw by the
    guarded policy.
    """
    batches = list(batches)
    warmup_batches = list(warmup_batches) if warmup_batches is not None else batches
    exact = parameter_gradient(model, batches, loss_fn)
    rows = []
    for k in ranks:
        settings = {
            **options,
            "rank": k,
            "max_rank": max(k, int(options.get("max_rank") or k)),
            "reset_rows": max(k, int(options.get("reset_rows") or 1024)),
            "include": (glob_literal(site),),
        }
        state = _warm_state(model, warmup_batches, loss_fn, warmup, **settings)
        grad, probe = _probe(model, batches, loss_fn, state, **settings)
        row = probe.report().site(site)
        rows.append(SiteGradient(site, row.dim, row.rank, row.fidelity, probe.relative_error(site),
                                 _cosine(grad, exact), _relative(grad, exact)))
    return rows
