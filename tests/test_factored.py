"""Factored weight gradients (DESIGN hard part 13): a linear's coded input gives grad_W = (dY^T Z) Q^T.

Against a hook-free twin where the codes are lossless (inputs of exactly the coded rank), against
reconstruct-then-matmul (``factored=False``) where they are not, and where autograd raises or frees.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import laser
from laser.factored import WeightGradSink, factored_weight_grad
from laser.methods.projection import LowRankCodes

RANK = 8  # the rank of every input below: codes of this rank are lossless


def _low_rank(*shape: int, rank: int = RANK - 1, seed: int = 0) -> torch.Tensor:
    """A (..., D) tensor whose rows lie in one fixed ``rank``-dimensional subspace (the same for every seed,
    so a basis tracked over steps stays lossless; a bias adds one more dimension downstream)."""
    mixing = torch.randn(rank, shape[-1], generator=torch.Generator().manual_seed(1234))
    return torch.randn(*shape[:-1], rank, generator=torch.Generator().manual_seed(seed)) @ mixing


class _Net(nn.Module):
    """Three linears on 3-D inputs (one without bias); linear maps keep the rows' rank within RANK."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.mid = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.inp(x)))


def _config(**options) -> laser.LaserConfig:
    return laser.LaserConfig(**{"rank": RANK, "min_numel": 0, "policy": "paper", **options})


def _steps(model: nn.Module, method, batches: list[torch.Tensor], loss_fn=None) -> list[list[torch.Tensor]]:
    """Forward (inside ``with method:`` when given), backward and method step per batch; the gradients."""
    loss_fn = loss_fn or (lambda m, x: m(x).square().mean())
    grads = []
    for x in batches:
        if method is None:
            loss = loss_fn(model, x)
        else:
            with method:
                loss = loss_fn(model, x)
        loss.backward()
        if method is not None:
            method.step()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
    return grads


def _assert_close(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]], rtol: float) -> None:
    assert len(got) == len(want)
    for step_got, step_want in zip(got, want, strict=True):
        assert len(step_got) == len(step_want)
        for g, w in zip(step_got, step_want, strict=True):
            assert (g - w).norm() <= rtol * w.norm() + 1e-12, ((g - w).norm() / w.norm()).item()


def _batches(count: int = 3, dim: int = 64) -> list[torch.Tensor]:
    return [_low_rank(4, 25, dim, seed=s) for s in range(count)]


# ------------------------------------------------------------------------------------------ the math
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), din=st.integers(1, 24), dout=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_factored_product_is_the_weight_gradient_at_full_rank(rows, din, dout, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, din, generator=g, dtype=torch.float64)
    dy = torch.randn(rows, dout, generator=g, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(din, din, generator=g, dtype=torch.float64))  # square: full rank
    assert torch.allclose(factored_weight_grad(dy, x @ basis, basis), dy.T @ x, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), din=st.integers(2, 24), dout=st.integers(1, 24), seed=st.integers(0, 2**16),
       data=st.data())
def test_factored_product_equals_reconstruct_then_matmul_at_low_rank(rows, din, dout, seed, data):
    k = data.draw(st.integers(1, din - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, din, generator=g, dtype=torch.float64)
    dy = torch.randn(rows, dout, generator=g, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(din, k, generator=g, dtype=torch.float64))
    codes = x @ basis
    assert torch.allclose(factored_weight_grad(dy, codes, basis), dy.T @ (codes @ basis.T), atol=1e-10)


# ------------------------------------------------------------------------------- against the twin
def test_equals_the_twin_where_codes_are_lossless_and_reports_the_factored_sites():
    torch.manual_seed(0)
    model = _Net()
    twin = copy.deepcopy(model)
    comp = laser.Compressor(model, _config())
    batches = _batches()
    _assert_close(_steps(model, comp, batches), _steps(twin, None, batches), rtol=1e-4)
    with comp:
        model(batches[0]).square().mean().backward()
    report = comp.report()
    factored = {s.name: s.factored for s in report.sites}
    assert factored == {"inp/input:64": 1, "inp/addmm:64": 1, "mid/mm:64": 1, "<outside>/addmm:16": 0}
    assert report.site("inp/input:64").stored_bytes < report.site("inp/input:64").raw_bytes
    assert "factored" in str(report)


class _Loop(nn.Module):
    """One weight-tied linear run four times (no bias, no nonlinearity: the steps' rows span at most four
    times the input's rank), then a head."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.step = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            x = self.step(x)
        return self.head(x)


def test_recursion_steps_sum_their_products_before_the_basis(monkeypatch):
    torch.manual_seed(0)
    model = _Loop()
    twin, reference = copy.deepcopy(model), copy.deepcopy(model)
    sums = []
    backward = WeightGradSink.backward
    monkeypatch.setattr(WeightGradSink, "backward", staticmethod(lambda ctx, g: sums.append(g) or backward(ctx, g)))
    batches = [_low_rank(4, 25, 64, rank=3, seed=s) for s in range(3)]
    comp = laser.Compressor(model, _config(rank=16))
    got = _steps(model, comp, batches)
    _assert_close(got, _steps(twin, None, batches), rtol=1e-4)
    # After the first step (per-tensor bases), the inputs of calls 2-4 of `step` share a site and its basis
    # (call 1's input is another site): call 2 makes the sink, calls 3 and 4 return dY^T Z to it, summed
    # by autograd, one product with Q^T per training step.
    assert [tuple(g.shape) for g in sums if g is not None] == [(64, 16), (64, 16)]
    assert {s.name: s.factored for s in comp.report().sites} == {"step/input:64": 1, "step/mm:64": 4,
                                                                 "<outside>/addmm:16": 0}
    recon = laser.Compressor(reference, _config(rank=16, factored=False))
    _assert_close(got, _steps(reference, recon, batches), rtol=1e-5)


def test_bf16_autocast_equals_the_twin_and_reconstruct_then_matmul():
    torch.manual_seed(0)
    model = _Net()
    twin, reference = copy.deepcopy(model), copy.deepcopy(model)

    def loss_fn(m, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x).float().square().mean()

    batches = _batches()
    comp = laser.Compressor(model, _config())
    got = _steps(model, comp, batches, loss_fn)
    assert sum(s.factored for s in comp.report().sites) == 3
    _assert_close(got, _steps(twin, None, batches, loss_fn), rtol=3e-2)  # bf16 codes against bf16 inputs
    recon = laser.Compressor(reference, _config(factored=False))
    _assert_close(got, _steps(reference, recon, batches, loss_fn), rtol=2e-2)
    for p in model.parameters():
        assert p.dtype == torch.float32


class _Checkpointed(nn.Module):
    """A linear outside a checkpointed pair of linears (non-reentrant)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(64, 64)
        self.block = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, self.first(x), use_reentrant=False)


def test_checkpointed_region_runs_as_before_and_equals_the_twin():
    torch.manual_seed(0)
    model = _Checkpointed()
    twin, reference = copy.deepcopy(model), copy.deepcopy(model)
    batches = _batches()
    comp = laser.Compressor(model, _config())
    got = _steps(model, comp, batches)
    _assert_close(got, _steps(twin, None, batches), rtol=1e-4)
    _assert_close(got, _steps(reference, laser.Compressor(reference, _config(factored=False)), batches), rtol=1e-5)
    # Only the linear outside the checkpoint took the factored path; inside, the checkpoint's hooks save.
    assert sum(s.factored for s in comp.report().sites) == 1


def test_reentrant_checkpoint_and_a_frozen_weight():
    torch.manual_seed(0)
    model = _Net()
    model.mid.weight.requires_grad_(False)  # frozen: its input is not saved, as without the method
    twin = copy.deepcopy(model)

    def loss_fn(m, x):
        h = checkpoint(m.inp, x, use_reentrant=True)
        return m.out(m.mid(h)).square().mean()

    batches = [b.requires_grad_() for b in _batches()]
    comp = laser.Compressor(model, _config())
    _assert_close(_steps(model, comp, batches, loss_fn), _steps(twin, None, batches, loss_fn), rtol=1e-4)
    assert {s.name: s.factored for s in comp.report().sites if s.factored} == {"mid/mm:64": 1}


# --------------------------------------------------------------------- against reconstruct-then-matmul
@pytest.mark.parametrize("options", [{}, {"quantize": "int8"}, {"policy": "guarded", "threshold": 0.99}])
def test_low_rank_equals_reconstruct_then_matmul(options):
    torch.manual_seed(0)
    model = _Net()
    reference = copy.deepcopy(model)
    noise = [0.05 * torch.randn(4, 25, 64, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    batches = [_low_rank(4, 25, 64, rank=3, seed=s) + n for s, n in enumerate(noise)]  # near rank 3, not lossless
    comp = laser.Compressor(model, _config(rank=4, **options))
    recon = laser.Compressor(reference, _config(rank=4, factored=False, **options))
    _assert_close(_steps(model, comp, batches), _steps(reference, recon, batches), rtol=1e-5)
    got, want = comp.report(), recon.report()
    assert [(s.name, s.stored_bytes, s.raw_bytes, s.fallbacks) for s in got.sites] == \
        [(s.name, s.stored_bytes, s.raw_bytes, s.fallbacks) for s in want.sites]
    assert sum(s.factored for s in got.sites) > 0 and sum(s.factored for s in want.sites) == 0


def test_trm_site_names_bytes_and_gradients_are_those_of_reconstruct_then_matmul():
    from laser.data.maze import generate
    from laser.models.trm import TRM, preset

    torch.manual_seed(0)
    model = TRM(dataclasses.replace(preset("tiny"), hidden=64, heads=2, L_cycles=3, seq_len=49))
    reference = copy.deepcopy(model)
    inputs, targets = (torch.from_numpy(a) for a in generate(8, size=7, seed=0))
    comp = laser.Compressor(model, laser.LaserConfig(rank=16))
    recon = laser.Compressor(reference, laser.LaserConfig(rank=16, factored=False))
    loss_fn = lambda m, x: m.loss(m(x), targets)  # noqa: E731
    _assert_close(_steps(model, comp, [inputs] * 3, loss_fn), _steps(reference, recon, [inputs] * 3, loss_fn),
                  rtol=1e-5)
    got, want = comp.report(), recon.report()
    assert [(s.name, s.stored_bytes, s.reasons) for s in got.sites] == \
        [(s.name, s.stored_bytes, s.reasons) for s in want.sites]
    assert {s.name for s in got.sites if s.factored} >= {"blocks.0.mlp.down/mul:256", "blocks.0.mlp.gate_up/mul:64"}


# ------------------------------------------------------------------------- where autograd raises or frees
def test_in_place_change_of_a_coded_linear_input_raises_like_autograd():
    torch.manual_seed(0)
    model = _Net()
    comp = laser.Compressor(model, _config())
    x = _low_rank(4, 25, 64)
    for method in (comp, None):
        with comp if method else torch.enable_grad():
            h = model.inp(x)
            loss = model.out(model.mid(h)).square().mean()
        h.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    assert comp.report().site("inp/addmm:64").factored == 1


def _records() -> int:
    gc.collect()
    return sum(isinstance(o, LowRankCodes) for o in gc.get_objects())


def test_storages_and_codes_are_freed_as_autograd_frees_them():
    torch.manual_seed(0)
    model = _Net()
    comp = laser.Compressor(model, _config())
    x = _low_rank(4, 25, 64)
    with comp:
        h = model.inp(x)
        loss = model.out(model.mid(h)).square().mean()
    storage = torch.multiprocessing.reductions.StorageWeakRef(h.untyped_storage())
    del h
    gc.collect()
    assert storage.expired()  # the coded linear input is not kept alive by the graph
    assert _records() > 0
    loss.backward()
    assert _records() == 0  # released by backward, although the loss (and its graph) is alive
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    with comp:
        loss = model(x).square().mean()
    del loss  # a graph dropped without backward frees its codes
    assert _records() == 0


def test_retain_graph_gives_the_same_gradient_twice():
    torch.manual_seed(0)
    model = _Net()
    comp = laser.Compressor(model, _config())
    x = _low_rank(4, 25, 64)
    with comp:
        loss = model(x).square().mean()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss.backward()
    for p, g in zip(model.parameters(), first, strict=True):
        assert torch.equal(p.grad, g)


def test_a_linear_input_saved_by_another_op_is_stored_once():
    torch.manual_seed(0)
    model = _Net()
    twin = copy.deepcopy(model)

    def loss_fn(m, x):
        h = m.inp(x)
        return (m.mid(h) + h * h).square().mean()  # mul saves h (twice) beside the linear

    batches = _batches()
    comp = laser.Compressor(model, _config(rank=2 * RANK))  # h * h has rank up to 36: not lossless
    reference = copy.deepcopy(twin)
    recon = laser.Compressor(reference, _config(rank=2 * RANK, factored=False))
    _assert_close(_steps(model, comp, batches, loss_fn), _steps(reference, recon, batches, loss_fn), rtol=1e-5)
    site = comp.report().site("inp/addmm:64")
    assert site.tensors == 1 and site.raw_bytes == 4 * 25 * 64 * 4 and site.factored == 1
    assert site.stored_bytes == recon.report().site("inp/addmm:64").stored_bytes


def test_create_graph_differentiates_through_the_decoded_input():
    torch.manual_seed(0)
    model = _Net()
    twin = copy.deepcopy(model)
    comp = laser.Compressor(model, _config())
    x = _low_rank(4, 25, 64)

    def grad_norm(m, method):
        with method if method else torch.enable_grad():
            loss = m(x).square().mean()
        grads = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        return [[p.grad for p in m.parameters()]]

    _assert_close(grad_norm(model, comp), grad_norm(twin, None), rtol=1e-4)


def test_compiled_model_falls_back_and_trains_alike():
    torch.manual_seed(0)
    model = _Net()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.warns(UserWarning, match="torch.compile"):
        comp = laser.Compressor(compiled, _config())
    batches = _batches()
    _assert_close(_steps(compiled, comp, batches), _steps(twin, None, batches), rtol=1e-4)


# ----------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for name, build, data_rank, rank_coded in (("net", _Net, RANK - 1, RANK), ("loop", _Loop, 3, 16)):
        torch.manual_seed(0)
        model = build()
        twin = copy.deepcopy(model)
        ddp, ddp_twin = nn.parallel.DistributedDataParallel(model), nn.parallel.DistributedDataParallel(twin)
        comp = laser.Compressor(ddp, _config(rank=rank_coded))
        batches = [_low_rank(2, 25, 64, rank=data_rank, seed=10 * s + rank) for s in range(3)]  # own shards
        got, want = _steps(ddp, comp, batches), _steps(ddp_twin, None, batches)
        results[name] = {"got": got, "want": want, "factored": sum(s.factored for s in comp.report().sites)}
    torch.save(results, os.path.join(out, f"ddp{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_gradients_equal_the_twins(ranks_results):
    results = ranks_results(_ddp_worker)
    for name, factored in (("net", 3), ("loop", 5)):  # the loop's steps sum through a WeightGradSink
        for result in results:
            assert result[name]["factored"] == factored
            _assert_close(result[name]["got"], result[name]["want"], rtol=1e-4)
        _assert_close(results[0][name]["got"], results[1][name]["got"], rtol=1e-6)  # averaged across ranks
