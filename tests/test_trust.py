"""Where a hook-free model gives a gradient, raises an error or frees memory, LASER does the same.

DESIGN hard parts 10-14 and issue 12: in-place changes raise autograd's own error, dropped graphs free
what they saved, masks and loss terms stay exact, weights are never activations, a site is one stream,
every raw storage has its reason, a site that cannot be tracked stops costing, threads and defaults.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import laser
from laser.hooks import Reason

LOSSLESS = {"rank": 64, "min_numel": 0, "policy": "paper"}


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def run_steps(model: nn.Module, comp: laser.Compressor, loss_fn, steps: int) -> laser.Report:
    """``steps`` training steps (no optimizer) under ``comp``; the last step's report."""
    for _ in range(steps):
        model.zero_grad()
        with comp:
            loss = loss_fn()
        loss.backward()
        report = comp.report()
        comp.step()
    return report


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


class Tanh2(nn.Module):
    """Saves outputs of ops that save their result (tanh), inputs of linears, and a product."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x)) * self.b(x)


# ------------------------------------------------------------------------------------ in place (10)
@pytest.mark.parametrize("method", ["none", "laser"])
def test_weight_changed_in_place_before_backward_raises_like_autograd(method):
    torch.manual_seed(0)
    model, x = Tanh2(), torch.randn(128, 64, requires_grad=True)  # so backward reads the weights
    loss = model(x).square().mean()
    with torch.no_grad():
        model.a.weight.add_(1.0)  # an optimizer step taken before backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    comp = laser.methods.build(method, model, **(LOSSLESS if method == "laser" else {"min_numel": 0}))
    with comp:
        loss = model(x).square().mean()
    with torch.no_grad():
        model.b.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("coded", [True, False])
def test_activation_changed_in_place_before_backward_raises_for_raw_and_coded(coded):
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    x = torch.randn(256, 64)
    options = dict(LOSSLESS, rank=16, min_numel=0 if coded else 10**9)
    comp = laser.Compressor(lin, laser.LaserConfig(**options))
    for _ in range(2):  # the second step codes against a tracked basis
        with comp:
            h = lin(x)
            y = h.sin()  # saves h
        report = comp.report()
        assert report.site("<outside>/addmm:64").reasons == ({"excluded": 1} if coded else {"too small": 1})
        y.sum().backward()
        comp.step()
    comp = laser.Compressor(lin, laser.LaserConfig(**options, model_only=False))
    for _ in range(2):
        with comp:
            h = lin(x)
            y = h.sin()
        assert (comp.report().site("<outside>/addmm:64").fallbacks == 0) == coded
        y.sum().backward()
        comp.step()
    for method in (comp, contextlib.nullcontext()):  # LASER, then the hook-free twin: both raise
        with method:
            h = lin(x)
            y = h.sin()
        with torch.no_grad():
            h.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_coded_storage_is_freed_though_its_version_is_checked():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    comp = laser.Compressor(lin, laser.LaserConfig(rank=4, min_numel=0, model_only=False, policy="paper"))
    with comp:
        h = lin(torch.randn(512, 64))
        y = h.sin()
    ref = StorageWeakRef(h.untyped_storage())
    assert comp.report().site("<outside>/addmm:64").fallbacks == 0
    del h
    gc.collect()
    assert ref.expired()  # the version probe holds no memory of the storage
    y.sum().backward()


# ------------------------------------------------------------------------------- dropped graphs (10)
@pytest.mark.parametrize("method", ["none", "laser"])
def test_graph_dropped_without_backward_frees_everything_it_saved(method):
    torch.manual_seed(0)
    model = Tanh2()
    comp = laser.methods.build(method, model, **(LOSSLESS if method == "laser" else {"min_numel": 0}))
    refs = []
    for _ in range(3):  # a step skipped on a NaN loss, an evaluation under grad
        with comp:
            out = model(torch.randn(256, 64))
            refs.append(StorageWeakRef(out.untyped_storage()))
            tanh_out = out.grad_fn.next_functions[0][0]  # MulBackward saves tanh's output
            refs.append(StorageWeakRef(tanh_out._saved_result.untyped_storage()))
            loss = out.square().mean()
        del out, loss, tanh_out
        comp.step()
    gc.collect()
    assert all(r.expired() for r in refs)


# --------------------------------------------------------------------------------- masks, loss (11)
class Masks(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        relu = torch.relu(h)  # saves its output
        hard = F.hardtanh(h * 0.5)  # saves its input
        leaky = F.leaky_relu(h + 1.0, 0.1)  # saves its input
        clamp = (h - 1.0).clamp(min=-0.5, max=0.5)  # saves its input
        return relu.sum(-1) + hard.sum(-1) + leaky.sum(-1) + clamp.sum(-1)


def test_masks_and_signs_stay_exact_and_are_reported():
    torch.manual_seed(0)
    model, x = Masks(), torch.randn(256, 64)
    twin = copy.deepcopy(model)
    twin(x).square().mean().backward()
    comp = laser.Compressor(model, laser.LaserConfig(rank=2, min_numel=0, quantize="int8", policy="paper"))
    report = run_steps(model, comp, lambda: model(x).square().mean(), 3)
    masks = sum(s.reasons.get(Reason.MASK, 0) for s in report.sites)
    assert masks == 4  # relu's output, hardtanh's, leaky relu's and clamp's inputs
    # the linear's input is coded at rank 2 (lossy), so compare the mask-read gradient of the bias
    assert cosine(model.lin.bias.grad, twin.lin.bias.grad) > 0.9


def test_max_pool_input_is_kept_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(4, 4, 16, 16).to(memory_format=torch.channels_last)
    comp = laser.Compressor(conv, laser.LaserConfig(rank=2, min_numel=0, min_dim=1, model_only=False, policy="paper"))
    with comp:
        out = F.max_pool2d(torch.tanh(conv(x)), 2)
    report = comp.report()
    assert any(s.reasons.get(Reason.MASK) for s in report.sites), str(report)
    out.sum().backward()


class WithLoss(nn.Module):
    """A model that computes its own loss (as Hugging Face models do with ``labels=``)."""

    def __init__(self, d: int = 32, vocab: int = 100) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(d, d), nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(torch.tanh(self.body(x))), labels)


def test_a_loss_computed_inside_the_model_stays_raw():
    torch.manual_seed(0)
    model, x, labels = WithLoss(), torch.randn(512, 32), torch.randint(100, (512,))
    twin = copy.deepcopy(model)
    twin(x, labels).backward()
    # min_dim=33: only the vocabulary-wide tensors (the loss's log-softmax) could be coded
    comp = laser.Compressor(model, laser.LaserConfig(rank=4, min_numel=0, min_dim=33, policy="paper"))
    report = run_steps(model, comp, lambda: model(x, labels), 2)
    assert sum(s.reasons.get(Reason.LOSS, 0) for s in report.sites) >= 1
    assert torch.equal(grads(model), grads(twin))


def test_int8_fidelity_in_the_report_is_what_is_stored():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    x = torch.randn(512, 64)
    fidelity = {}
    for quantize in (None, "int8"):
        comp = laser.Compressor(lin, laser.LaserConfig(rank=64, min_numel=0, quantize=quantize, policy="paper"))
        for _ in range(2):
            with comp:
                lin(x).sum().backward()
            fidelity[quantize] = comp.report().site("Linear/input:64").fidelity
            comp.step()
    assert fidelity[None] == pytest.approx(1.0, abs=1e-6)  # full rank, float codes: exact
    assert 0.99 < fidelity["int8"] < 1.0 - 1e-6  # the rounding shows


# -------------------------------------------------------------------------------------- weights (12)
class Adapter(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.down, self.up = nn.Linear(d, 4, bias=False), nn.Linear(4, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = torch.tanh(self.frozen(x) + self.up(self.down(x)))
        return x


def test_frozen_weights_under_autocast_are_never_coded():
    torch.manual_seed(0)
    model, x = Adapter(), torch.randn(256, 64)
    seen = []

    class Spy(laser.Compressor):
        def encode(self, rows, site):
            seen.append(rows.clone())
            return super().encode(rows, site)

    comp = Spy(model, laser.LaserConfig(rank=8, min_numel=0))
    with comp, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().square().mean().backward()
    weight = model.frozen.weight.to(torch.bfloat16)
    assert seen and not any(r.shape == weight.shape and torch.equal(r, weight) for r in seen)
    assert not any(r.shape == weight.T.shape and torch.equal(r, weight.T) for r in seen)


# ------------------------------------------------------------------------------------------ sites (3)
class TwoStreams(nn.Module):
    """Two different exactly rank-4 activations made inside one module."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sin(a @ self.w).sum() + torch.sin(b @ self.w).sum()  # saves a, b, a @ w, b @ w


def test_two_streams_in_one_module_are_two_sites_and_exact_at_their_rank():
    torch.manual_seed(0)
    n, d, r = 256, 64, 4
    left, right = torch.linalg.qr(torch.randn(d, 2 * r)).Q.T.split(r)  # two orthogonal rank-4 subspaces
    a, b = torch.randn(n, r) @ left, torch.randn(n, r) @ right
    model = TwoStreams(d)
    twin = copy.deepcopy(model)
    twin(a, b).backward()
    comp = laser.Compressor(model, laser.LaserConfig(rank=r, min_numel=0, policy="paper"))
    report = run_steps(model, comp, lambda: model(a, b), 3)
    names = {s.name for s in report.sites}
    assert names == {"TwoStreams/input:64", "TwoStreams/input#1:64", "TwoStreams/mm:64", "TwoStreams/mm#1:64"}
    first = grads(model)
    assert (first - grads(twin)).norm() <= 1e-4 * grads(twin).norm()


def test_recursion_steps_through_a_child_module_share_one_site():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
    model = nn.Module()
    model.block = block

    def forward(x):
        for _ in range(4):
            x = block(x)
        return x

    comp = laser.Compressor(model, laser.LaserConfig(rank=8, min_numel=0))
    with comp:
        forward(torch.randn(64, 32)).sum().backward()
    rows = {s.name: s.tensors for s in comp.report().sites}
    # the Tanh saves its output first (the next step's linear input: the same storage)
    assert rows["block.1/tanh:32"] == 4 and rows["block.0/input:32"] == 1, rows


# ------------------------------------------------------------------------ reasons, bytes, cost (5, 14)
def test_every_raw_storage_has_its_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    comp = laser.Compressor(model, laser.LaserConfig(rank=4, exclude=("1/*",)))
    with comp:
        model(torch.randn(64, 64)).square().mean().backward()  # the output, 64 x 8, is under min_numel
    report = comp.report()
    for row in report.sites:
        assert sum(row.reasons.values()) == row.fallbacks
    assert report.site("1/tanh:64").reasons == {Reason.EXCLUDED: 1}  # saved by the Tanh, then by Linear 2
    assert report.site("<outside>/addmm:8").reasons == {Reason.TOO_SMALL: 1}
    assert "kept raw because" in str(report) and "excluded 1" in str(report)


def test_state_bytes_are_counted_by_hand():
    torch.manual_seed(0)
    n, d, k = 512, 64, 8
    lin = nn.Linear(d, d)
    cfg = laser.LaserConfig(rank=k, min_numel=0, policy="paper")
    comp = laser.Compressor(lin, cfg)
    mixing = torch.randn(4, d)
    for step in range(3):
        with comp:
            lin(torch.randn(n, 4) @ mixing).sum().backward()  # one rank-4 subspace < k: fidelity 1, no reset due
        row = comp.report().site("Linear/input:64")
        sample_rows = min(n, cfg.sample_size) if step == 0 else cfg.growth
        accumulator = 0 if step == 0 else d * k * 4
        assert row.state_bytes == accumulator + sample_rows * (d * 4 + 8), step
        codes = n * k * 4 + d * k * 4
        assert row.stored_bytes == codes + row.state_bytes
        comp.step()


def test_break_even_is_decided_on_the_current_step():
    torch.manual_seed(0)
    d, k = 64, 16
    lin = nn.Linear(d, d)
    comp = laser.Compressor(lin, laser.LaserConfig(rank=k, min_numel=0, policy="paper"))
    for rows in (512, 512, 20, 20):  # 20 rows: codes + basis (20*16 + 64*16) > 20*64 raw
        with comp:
            lin(torch.randn(rows, d)).sum().backward()
        row = comp.report().site("Linear/input:64")
        assert row.stored_bytes - row.state_bytes <= row.raw_bytes
        if rows == 20:
            assert row.reasons == {Reason.BREAK_EVEN: 1}
        comp.step()


def test_first_step_fidelity_is_measured():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    comp = laser.Compressor(lin, laser.LaserConfig(rank=4, min_numel=0, policy="paper"))
    with comp:
        lin(torch.randn(512, 64)).sum().backward()
    assert comp.report().site("Linear/input:64").fidelity < 0.5  # a full-rank stream at rank 4


def test_a_site_that_never_reaches_its_threshold_stops_being_tracked():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    cfg = laser.LaserConfig(rank=4, max_rank=8, min_numel=0, patience=2, max_resets=2, policy="paper")
    comp = laser.Compressor(lin, cfg)
    history = []
    for _ in range(12):
        with comp:
            lin(torch.randn(512, 64)).sum().backward()  # white noise: no rank-8 basis reaches 0.95
        history.append(comp.report().site("Linear/input:64").reasons.get(Reason.UNTRACKED, 0))
        comp.step()
    state = comp.sites["Linear/input:64"]
    assert state.untracked and state.resets == 2
    assert history[-1] == 1 and history.index(1) <= 1 + cfg.patience * (cfg.max_resets + 1)
    before = comp.seconds["encode"]
    with comp:
        lin(torch.randn(512, 64)).sum().backward()
    assert comp.report().site("Linear/input:64").stored_bytes == 512 * 64 * 4  # raw, no state
    assert comp.seconds["encode"] - before < 0.05


def _untracked_history(comp: laser.Compressor, lin: nn.Linear, batches) -> list[bool]:
    """Whether the site was stored raw as untracked at each step of ``batches``."""
    history = []
    for x in batches:
        with comp:
            lin(x).sum().backward()
        history.append(comp.report().site("Linear/input:64").reasons.get(Reason.UNTRACKED, 0) > 0)
        comp.step()
    return history


def test_an_untracked_site_is_retried_with_exponential_back_off():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    cfg = laser.LaserConfig(rank=4, max_rank=8, min_numel=0, patience=1, max_resets=0, retry_after=3, policy="paper")
    comp = laser.Compressor(lin, cfg)
    history = _untracked_history(comp, lin, [torch.randn(512, 64) for _ in range(30)])  # never compresses
    # Steps 0 (initialisation) and 1 (low: a reset is due, none allowed) are tracked; then raw for 3, 6, 12
    # steps, each retry tracked for two steps (its initialisation and its low step), as step 0 and 1 were.
    tracked = [i for i, raw in enumerate(history) if not raw]
    assert tracked == [0, 1, 5, 6, 13, 14, 27, 28]
    assert comp.sites["Linear/input:64"].retries == 3


def test_a_retried_site_compresses_once_its_stream_does_and_never_retried_without_retry_after():
    torch.manual_seed(0)
    mix = torch.linalg.qr(torch.randn(64, 4)).Q.T  # (4, 64): a rank-4 stream
    batches = [torch.randn(512, 64) for _ in range(6)] + [torch.randn(512, 4) @ mix for _ in range(20)]
    for retry_after, compresses in [(None, False), (4, True)]:
        lin = nn.Linear(64, 64)
        comp = laser.Compressor(lin, laser.LaserConfig(rank=4, min_numel=0, patience=1, max_resets=1,
                                                       retry_after=retry_after, policy="paper"))
        history = _untracked_history(comp, lin, batches)
        assert history[5] and history[-1] != compresses
        row = comp.report().site("Linear/input:64")
        assert (row.stored_bytes - row.state_bytes < row.raw_bytes / 4) == compresses  # codes and basis
        if compresses:
            assert row.fidelity > 0.999


def test_retry_schedule_survives_a_state_dict_round_trip():
    torch.manual_seed(0)
    cfg = laser.LaserConfig(rank=4, max_rank=8, min_numel=0, patience=1, max_resets=0, retry_after=5, policy="paper")
    batches = [torch.randn(512, 64) for _ in range(16)]
    lin = nn.Linear(64, 64)
    straight = _untracked_history(laser.Compressor(lin, cfg), lin, batches)
    first = laser.Compressor(lin, cfg)
    resumed_history = _untracked_history(first, lin, batches[:4])
    again = laser.Compressor(lin, cfg)
    again.load_state_dict(first.state_dict())
    resumed_history += _untracked_history(again, lin, batches[4:])
    assert resumed_history == straight and straight.count(False) == 4  # steps 0, 1 and the retry at 7, 8


def test_expansions_count_only_growth():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    cfg = laser.LaserConfig(rank=4, max_rank=4, min_numel=0, patience=100, policy="paper")
    comp = laser.Compressor(lin, cfg)
    for _ in range(4):
        with comp:
            lin(torch.randn(512, 64)).sum().backward()
        comp.step()
    assert comp.sites["Linear/input:64"].expansions == 0  # at max_rank nothing can be added


# ------------------------------------------------------------------------------------ threads (6)
@pytest.mark.parametrize("bases", ["site", "position"])
def test_one_compressor_from_two_threads(bases):
    torch.manual_seed(0)
    model = Tanh2()
    twin = copy.deepcopy(model)
    xs = [torch.randn(256, 64) for _ in range(2)]
    for x in xs:
        twin(x).square().mean().backward()
    comp = laser.Compressor(model, laser.LaserConfig(rank=64, min_numel=0, policy="paper", bases=bases))
    errors = []
    barrier = threading.Barrier(2)

    def work(x):
        try:
            with comp:
                barrier.wait()  # both threads inside `with comp:` at once
                loss = model(x).square().mean()
                barrier.wait()
            loss.backward()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(x,)) for x in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(s.tensors for s in comp.report().sites) == 2 * 4  # each thread's x, a(x), tanh out, b(x)
    assert (grads(model) - grads(twin)).norm() <= 1e-5 * grads(twin).norm()
    if bases == "position":  # each thread's forward counts its own positions: one per site, both at position 0
        assert {name.rpartition("@")[2] for name in comp.sites} == {"0"}


# ------------------------------------------------------------------------------------ defaults (7)
def test_defaults_derive_from_rank_and_only_an_explicit_pair_fails():
    assert laser.LaserConfig(rank=600).rank_ceiling("any") == 2400
    cfg = laser.LaserConfig(rank=2048, max_rank=2048)
    assert cfg.sample_size >= cfg.rank
    with pytest.raises(ValueError, match="max_rank=100 .*rank \\(128"):
        laser.LaserConfig(max_rank=100)
    with pytest.raises(ValueError, match="reset_rows=64 .*rank \\(128"):
        laser.LaserConfig(reset_rows=64)


def test_a_compiled_model_warns_what_its_site_names_lose():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    with pytest.warns(UserWarning, match="torch.compile graph"):
        laser.Compressor(torch.compile(model, backend="eager"))
    with pytest.warns(UserWarning, match="include/exclude patterns"):
        laser.Compressor(nn.Sequential(torch.compile(nn.Linear(8, 8), backend="eager")))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        laser.Compressor(nn.Sequential(nn.Linear(8, 8)))  # an eager model: no warning


def test_small_tensors_are_held_raw_until_their_step_pays_then_all_coded():
    torch.manual_seed(0)
    # one 24-row tensor (6 KiB) cannot pay for its codes (3 KiB) and a 64 x 32 basis and accumulator (16 KiB);
    # six of them can: the first five wait, held raw, and are coded with the sixth
    d, k, rows, steps = 64, 32, 24, 8
    lin = nn.Linear(d, d)
    model = nn.Module()
    model.lin = lin
    x = torch.randn(rows, 4) @ torch.randn(4, d)  # exactly rank 4: codes are exact once the basis holds it

    def forward():
        h = x
        for _ in range(steps):
            h = lin(h) * 0.0 + x  # each step's linear input is the same rank-4 stream
        return h.square().sum()

    twin = copy.deepcopy(lin)
    comp = laser.Compressor(model, laser.LaserConfig(rank=k, min_numel=0, policy="paper"))
    for _ in range(3):
        lin.zero_grad()
        with comp:
            loss = forward()
        loss.backward()
        row = comp.report().site("lin/add:64")
        comp.step()
    assert row.tensors == steps - 1 and row.fallbacks == 0  # every one coded, the first five after the fact
    assert not laser.methods.projection.pays(rows, d, k, None, torch.float32, laser.methods.laser.site_share(
        torch.float32))
    assert row.stored_bytes - row.state_bytes < row.raw_bytes
    h = x
    for _ in range(steps):
        h = twin(h) * 0.0 + x
    h.square().sum().backward()
    assert (lin.weight.grad - twin.weight.grad).norm() <= 1e-4 * twin.weight.grad.norm()


class Attention(nn.Module):
    def __init__(self, d: int = 64, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.heads = nn.Linear(d, 3 * d), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, hd)
        q, k = q * 1.5 + 0.1, k.tanh()  # new storages, as rotary embeddings make
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


@pytest.mark.parametrize("exact_qk", [True, False])
def test_attention_query_and_key_are_kept_exact_by_default(exact_qk):
    torch.manual_seed(0)
    model, x = Attention(), torch.randn(4, 32, 64)
    comp = laser.Compressor(model, laser.LaserConfig(rank=4, min_numel=0, exact_qk=exact_qk, policy="paper"))
    report = run_steps(model, comp, lambda: model(x).square().mean(), 2)
    attention = sum(s.reasons.get(Reason.ATTENTION, 0) for s in report.sites)
    assert attention == (2 if exact_qk else 0)  # q and k; v and the output may be coded
    coded = {s.name for s in report.sites if s.fallbacks < s.tensors}
    assert ("Attention/add:32" in coded) != exact_qk and ("Attention/tanh:32" in coded) != exact_qk
