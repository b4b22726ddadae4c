"""laser.checkpoint: non-reentrant checkpointing whose recomputed activations the active method stores.

Against hook-free twins (no checkpoint, and ``torch.utils.checkpoint``), where autograd raises, and where the
rebuilt records must be freed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import laser
from laser import recompute
from laser.models import looped_lm
from laser.models.trm import TRM, TRMConfig

RANK = 8


class _Block(nn.Module):
    def __init__(self, dim: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


class _Loop(nn.Module):
    """One weight-tied block applied ``steps`` times, each call through ``wrap`` (None: called as is)."""

    def __init__(self, wrap=None, steps: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.block, self.wrap, self.steps = _Block(dropout=dropout), wrap, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 1.0  # an activation, not the leaf input
        for _ in range(self.steps):
            h = self.wrap(self.block, h) if self.wrap is not None else self.block(h)
        return h.square().mean()


def _torch_ckpt(fn, *args):
    return torch_checkpoint(fn, *args, use_reentrant=False)


def _grads(model: nn.Module, x: torch.Tensor, method=None, seed: int = 0, amp: bool = False) -> list[torch.Tensor]:
    """Gradients of one step, the forward inside ``with method:`` when given (and bf16 autocast with ``amp``);
    a model returning logits is trained on their mean square."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), method or contextlib.nullcontext():
        out = model(x)
        loss = out if out.dim() == 0 else out.float().square().mean()
    loss.backward()
    if method is not None:
        method.step()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _pair(wrap, **kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    twin = _Loop(**kwargs)
    model = copy.deepcopy(twin)
    model.wrap = wrap
    return twin, model


def _assert_equal(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 0.0) -> None:
    for ga, gb in zip(a, b, strict=True):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=0.0 if atol == 0.0 else 1e-5)


def test_outside_a_method_it_is_torch_checkpoint():
    twin, model = _pair(laser.checkpoint)
    x = torch.randn(4, 6, 32)
    _assert_equal(_grads(model, x), _grads(twin, x))


def test_raw_method_gives_the_twins_gradients_and_names_the_twins_sites():
    twin, model = _pair(laser.checkpoint)
    x = torch.randn(4, 6, 32)
    plain = laser.methods.build("none", twin)
    _assert_equal(_grads(model, x, laser.methods.build("none", model)), _grads(twin, x, plain))
    method = laser.methods.build("none", model)
    _grads(model, x, method)
    report, reference = method.report(), plain.report()
    rebuilt = {row.name: (row.raw_bytes, row.tensors) for row in report.recomputed}
    # Each rerun starts from its call's input without history: one (4, 6, 32) fp32 storage a call, named as
    # an input of the block's first module; the twin names the same tensors by the ops that made them.
    assert rebuilt.pop("block.norm/input:32") == (3 * 4 * 6 * 32 * 4, 3)
    # Every other storage the twin saves inside the block is rebuilt and saved once per call, under its name.
    inside = {row.name: (row.raw_bytes, row.tensors) for row in reference.sites
              if row.name.startswith("block.")}
    inside.pop("block.norm/input:32")
    assert rebuilt == inside and len(inside) >= 4
    tensors, raw, stored = report.recomputed_totals()
    assert (tensors, raw) == (sum(r.tensors for r in report.recomputed), sum(r.raw_bytes for r in report.recomputed))
    assert stored == raw  # the raw method stores what it saw
    assert f"{tensors} tensors over {len(report.recomputed)} sites" in str(report)
    assert [row["name"] for row in report.to_dict()["recomputed"]] == [r.name for r in report.recomputed]
    # The totals are what the forward left for backward: the checkpointed calls' inputs and the loss.
    assert report.raw_bytes < reference.raw_bytes
    assert not any(row.name.startswith("block/") and "gelu" in row.name for row in report.sites)


def test_dropout_masks_are_replayed():
    torch.manual_seed(0)
    twin, model = _pair(laser.checkpoint, dropout=0.5)
    torch_twin = copy.deepcopy(twin)
    torch_twin.wrap = _torch_ckpt
    x = torch.randn(4, 6, 32)
    expected = _grads(torch_twin, x, seed=3)
    _assert_equal(_grads(model, x, laser.methods.build("none", model), seed=3), expected)
    _assert_equal(_grads(twin, x, seed=3), expected)  # the same masks as without checkpointing


def test_bf16_autocast_matches_torch_checkpoint():
    twin, model = _pair(laser.checkpoint)
    twin.wrap = _torch_ckpt
    x = torch.randn(4, 6, 32)
    _assert_equal(_grads(model, x, laser.methods.build("none", model), amp=True), _grads(twin, x, amp=True))


def _low_rank(*shape: int, rank: int = RANK - 1, seed: int = 2) -> torch.Tensor:
    mixing = torch.randn(rank, shape[-1], generator=torch.Generator().manual_seed(1))
    return torch.randn(*shape[:-1], rank, generator=torch.Generator().manual_seed(seed)) @ mixing


class _Linears(nn.Module):
    """Linear maps only: rows of a rank-7 input stay within rank 8 (a bias adds one dimension)."""

    def __init__(self, dim: int = 48) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)) * 2.0)


def _lossless(bases: str = "site") -> tuple[nn.Module, nn.Module, torch.Tensor, laser.ActivationMethod]:
    """Linears, their twin, a rank-7 input and LASER at rank 8: codes of every saved tensor are exact."""
    torch.manual_seed(0)
    block = _Linears()
    return block, copy.deepcopy(block), _low_rank(16, 12, 48), laser.methods.build(
        "laser", block, rank=RANK, min_numel=0, policy="paper", bases=bases)


@pytest.mark.parametrize("bases", ["site", "position"])
def test_lossless_codes_of_the_recomputation_give_the_twins_gradients(bases):
    block, twin, x, method = _lossless(bases)
    for _ in range(3):  # the first step codes against each tensor's own SVD basis, later ones the tracked one
        block.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        with method:
            loss = laser.checkpoint(block, x).square().mean()
        loss.backward()
        method.step()
        twin(x).square().mean().backward()
        _assert_equal([p.grad for p in block.parameters()], [p.grad for p in twin.parameters()], atol=1e-5)
    recomputed = method.report().recomputed
    assert recomputed and sum(r.stored_bytes for r in recomputed) < sum(r.raw_bytes for r in recomputed)
    assert any(r.rank == RANK for r in recomputed)
    # The three linears' inputs: each weight gradient made from the rerun's codes (the factored path).
    assert sum(r.factored for r in recomputed) == 3


def test_lossy_codes_change_gradients_by_their_fidelity_only():
    torch.manual_seed(0)
    twin, model = _pair(laser.checkpoint)
    x = torch.randn(8, 16, 32)
    method = laser.methods.build("laser", model, rank=16, min_numel=0, policy="paper")
    for _ in range(4):
        got = _grads(model, x, method)
    expected = _grads(twin, x)
    cosine = F.cosine_similarity(torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in expected]),
                                 dim=0)
    assert 0.9 < cosine < 1.0  # coded (not exact) and close
    recomputed = method.report().recomputed
    assert sum(r.stored_bytes for r in recomputed) < sum(r.raw_bytes for r in recomputed)


def test_records_are_freed_by_backward_and_by_dropping_the_graph(monkeypatch):
    _, model = _pair(laser.checkpoint)
    method = laser.methods.build("laser", model, rank=16, min_numel=0, policy="paper")
    x = torch.randn(8, 16, 32)
    frames = []

    class Spy(recompute._Frame):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            frames.append(weakref.ref(self))

    monkeypatch.setattr(recompute, "_Frame", Spy)
    with method:
        loss = model(x)
    loss.backward()
    gc.collect()
    assert len(frames) == 3 and all(f() is None for f in frames)  # backward freed each frame and its records
    frames.clear()
    with method:
        h = x * 1.0
        out = laser.checkpoint(model.block, h)
    storage = StorageWeakRef(h.untyped_storage())
    del out, h
    gc.collect()
    assert len(frames) == 1 and frames[0]() is None  # a graph dropped without backward frees its frame...
    assert storage.expired()  # ...and the input it kept (no reference cycle)


def test_retain_graph_recomputes_for_each_backward():
    twin, model = _pair(laser.checkpoint)
    x = torch.randn(4, 6, 32)
    method = laser.methods.build("none", model)
    with method:
        loss = model(x)
    loss.backward(retain_graph=True)
    loss.backward()
    twin(x).backward()
    _assert_equal([p.grad for p in model.parameters()], [2 * p.grad for p in twin.parameters()], atol=1e-6)


def test_an_input_modified_in_place_raises_like_autograd():
    block = _Block()
    x = torch.randn(4, 6, 32, requires_grad=True)
    with laser.methods.build("none", block):
        h = x * 1.0
        out = laser.checkpoint(block, h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_function_that_saves_other_tensors_on_recomputation_fails_clearly():
    calls = []

    def fn(x):
        calls.append(1)
        return x.exp().exp() if len(calls) == 1 else x.exp()

    x = torch.randn(5, 8, requires_grad=True)
    with laser.methods.build("none", nn.Linear(1, 1)):
        out = laser.checkpoint(fn, x * 1.0)
    with pytest.raises(RuntimeError, match="laser.checkpoint: the recomputation saved 1 tensors, the forward 2"):
        out.sum().backward()

    def shapes(x):
        calls.append(1)
        return x.exp() if len(calls) == 1 else x[:2].exp()

    calls.clear()
    with laser.methods.build("none", nn.Linear(1, 1)):
        out = laser.checkpoint(shapes, x * 1.0)
    with pytest.raises(RuntimeError, match=r"saved tensor 0 was \(5, 8\)"):
        out.sum().backward()


def test_recomputation_stops_after_the_last_saved_tensor():
    seen = []

    def fn(x):
        y = x.exp()
        seen.append("end")  # after the last save: a recomputation that stops early never gets here
        return y

    x = torch.randn(5, 8, requires_grad=True)
    with laser.methods.build("none", nn.Linear(1, 1)):
        out = laser.checkpoint(fn, x * 1.0)
    out.sum().backward()
    assert seen == ["end"]
    torch.testing.assert_close(x.grad, x.detach().exp())


def test_no_grad_and_kwargs_pass_through():
    block = _Block()
    x = torch.randn(2, 3, 32)
    with laser.methods.build("none", block), torch.no_grad():
        out = laser.checkpoint(block, x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, block(x))
    with laser.methods.build("none", block):
        got = laser.checkpoint(lambda h, scale: block(h) * scale, x, scale=3.0)
    torch.testing.assert_close(got, block(x) * 3.0)


def test_trm_coded_recompute_matches_torch_checkpoint_and_is_validated():
    cfg = TRMConfig(vocab=5, seq_len=25, hidden=32, heads=4, L_cycles=2, checkpoint=True)
    torch.manual_seed(0)
    twin = TRM(cfg)
    model = TRM(TRMConfig(**{**cfg.__dict__, "coded_recompute": True}))
    model.load_state_dict(twin.state_dict())
    tokens = torch.randint(0, 5, (3, 25))
    _assert_equal(_grads(model, tokens, laser.methods.build("none", model)), _grads(twin, tokens), atol=1e-6)
    with pytest.raises(ValueError, match="coded_recompute .*checkpoint=True"):
        TRMConfig(coded_recompute=True)


def test_bf16_autocast_rerun_with_factored_linears_matches_the_twin():
    block, twin, x, method = _lossless()
    for _ in range(2):
        block.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with method:
                loss = laser.checkpoint(block, x).float().square().mean()
            expected = torch_checkpoint(twin, x, use_reentrant=False).float().square().mean()
        loss.backward()
        expected.backward()
        method.step()
        for got, want in zip(block.parameters(), twin.parameters(), strict=True):
            assert (got.grad - want.grad).norm() <= 3e-2 * want.grad.norm()  # bf16 codes of bf16 inputs
    assert sum(r.factored for r in method.report().recomputed) == 3


def test_a_saved_tensor_read_outside_backward_is_rebuilt():
    x = torch.randn(5, 8, requires_grad=True)
    with laser.methods.build("none", nn.Linear(1, 1)):
        y = laser.checkpoint(torch.exp, x * 1.0)
    for _ in range(2):  # every read outside a backward reruns the region
        torch.testing.assert_close(y.grad_fn._saved_result, y.detach())
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())


def test_a_compiled_block_inside_the_checkpoint_gives_the_twins_gradients():
    torch.manual_seed(0)
    block = _Block()
    twin = copy.deepcopy(block)
    compiled = torch.compile(block)
    x = torch.randn(4, 6, 32)
    method = laser.methods.build("none", block)
    with method:
        h = x * 1.0
        for _ in range(2):
            h = laser.checkpoint(compiled, h)
        loss = h.square().mean()
    loss.backward()
    h = x * 1.0
    for _ in range(2):
        h = twin(h)
    h.square().mean().backward()
    _assert_equal([p.grad for p in block.parameters()], [p.grad for p in twin.parameters()], atol=1e-6)
    assert sum(r.tensors for r in method.report().recomputed) > 0  # the compiled graph's saves, rerun


class _Checkpointed(nn.Module):
    """``_Linears`` through ``laser.checkpoint`` (``coded``) or called as is (the twin)."""

    def __init__(self, coded: bool) -> None:
        super().__init__()
        self.inner, self.coded = _Linears(), coded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return laser.checkpoint(self.inner, x) if self.coded else self.inner(x)


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _Checkpointed(coded=True)
    twin = copy.deepcopy(model)
    twin.coded = False
    ddp, ddp_twin = nn.parallel.DistributedDataParallel(model), nn.parallel.DistributedDataParallel(twin)
    method = laser.methods.build("laser", ddp, rank=RANK, min_numel=0, policy="paper")
    got, want = [], []
    for step in range(3):
        x = _low_rank(8, 12, 48, seed=10 * step + rank)  # each rank its own shard
        got.append(_grads(ddp, x, method))
        want.append(_grads(ddp_twin, x))
    factored = sum(r.factored for r in method.report().recomputed)
    torch.save({"got": got, "want": want, "factored": factored}, os.path.join(out, f"ddp{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_gradients_through_the_coded_rerun_equal_the_twins(ranks_results):
    results = ranks_results(_ddp_worker)
    for result in results:
        assert result["factored"] == 3
        for got, want in zip(result["got"], result["want"], strict=True):
            _assert_equal(got, want, atol=1e-5)
    for got, other in zip(results[0]["got"], results[1]["got"], strict=True):
        _assert_equal(got, other, atol=1e-6)  # averaged across the ranks


def _fsdp_worker(rank: int, world: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _Checkpointed(coded=True)
    twin = copy.deepcopy(model)
    twin.coded = False
    for m in (model, twin):  # the checkpointed block is its own FSDP unit, as a transformer block would be
        fully_shard(m.inner)
        fully_shard(m)
    method = laser.methods.build("laser", model, rank=RANK, min_numel=0, policy="paper")
    full = lambda grads: [g.full_tensor() if isinstance(g, DTensor) else g for g in grads]  # noqa: E731
    got, want = [], []
    for step in range(3):
        x = _low_rank(8, 12, 48, seed=10 * step + rank)  # each rank its own shard of the batch
        got.append(full(_grads(model, x, method)))
        want.append(full(_grads(twin, x)))
    report = method.report()
    torch.save({"got": got, "want": want, "factored": sum(r.factored for r in report.recomputed),
                "recomputed": len(report.recomputed)}, os.path.join(out, f"ddp{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_fsdp2_gradients_through_the_coded_rerun_equal_the_twins(ranks_results):
    # FSDP2 all-gathers the block's weights for the rerun in backward and reduce-scatters the factored
    # weight gradients like the twin's.
    results = ranks_results(_fsdp_worker)
    for result in results:
        assert result["recomputed"] > 0 and result["factored"] == 3
        for got, want in zip(result["got"], result["want"], strict=True):
            _assert_equal(got, want, atol=1e-5)
    for got, other in zip(results[0]["got"], results[1]["got"], strict=True):
        _assert_equal(got, other, atol=0.0)  # the full gradients are the same on both ranks


def test_looped_lm_coded_recompute_matches_torch_checkpoint_and_is_validated():
    cfg = dataclasses.replace(looped_lm.preset("text-tiny"), checkpoint=True)
    torch.manual_seed(0)
    twin = looped_lm.LoopedLM(cfg)
    model = looped_lm.LoopedLM(dataclasses.replace(cfg, coded_recompute=True))
    model.load_state_dict(twin.state_dict())
    tokens = torch.randint(0, 256, (2, 32))
    method = laser.methods.build("none", model)
    _assert_equal(_grads(model, tokens, method), _grads(twin, tokens), atol=1e-6)
    assert method.report().recomputed  # the loops' block stacks were rerun through laser.checkpoint
    with pytest.raises(ValueError, match="LoopedLMConfig.coded_recompute .*checkpoint=True"):
        looped_lm.LoopedLMConfig(coded_recompute=True)
