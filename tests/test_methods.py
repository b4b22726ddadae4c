"""The comparison methods (none, laser, quant, static, sketch, oracle) behind one protocol.

Expected byte counts and reconstruction bounds are computed here from first principles. What backward
sees is read off exactly: for ``y = x W^T`` and ``loss = sum_n y[n, n]`` the weight gradient is ``x_hat``.
"""

from __future__ import annotations

import copy
import io
import math
from collections import Counter, OrderedDict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import laser
from laser.methods import build, make_config, names, projection

ALL = ["none", "laser", "quant", "static", "sketch", "oracle"]
PROJECTIONS = ["static", "sketch", "oracle"]
# Options under which every method really compresses the looped model below (width 32, 64 rows a tensor).
OPTIONS = {
    "none": {},
    "laser": {"rank": 8},
    "quant": {"bits": 4, "stochastic": True},
    "static": {"rank": 8},
    "sketch": {"rank": 8},
    "oracle": {"rank": 8},
}


class Block(nn.Module):
    """Pre-norm attention + MLP block, weight-tied across the loop."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, hd), views of one storage
        att = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd)
        x = x + self.out(att.transpose(1, 2).reshape(b, length, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Looped(nn.Module):
    """Embed, the same block ``steps`` times, head."""

    def __init__(self, d_in: int = 8, dim: int = 32, heads: int = 2, steps: int = 3) -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(d_in, dim), Block(dim, heads), nn.Linear(dim, d_in)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for _ in range(self.steps):
            h = self.block(h)
        return self.head(h)


def looped(seed: int = 0) -> Looped:
    """A freshly initialised :class:`Looped` (same weights for the same seed)."""
    torch.manual_seed(seed)
    return Looped()


def batch(seed: int) -> torch.Tensor:
    """A (B, L, d_in) input batch for :class:`Looped`."""
    return torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(seed))  # (B, L, d_in)


def train_step(model: nn.Module, method: laser.ActivationMethod | None, x: torch.Tensor) -> dict:
    """One forward/backward (under ``method`` when given); the parameter gradients."""
    model.zero_grad(set_to_none=True)
    if method is None:
        loss = model(x).square().mean()
    else:
        with method:
            loss = model(x).square().mean()
    loss.backward()
    if method is not None:
        method.step()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def probe(rows: int, dim: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bias-free linear (dim -> rows + 1) at site ``fc/input:<dim>``: its weight gradient is the saved input.

    The input has no autograd history (op ``input``). The spare output row keeps the weight's shape from being
    the input's: a saved tensor without history of a parameter's shape is taken for a weight copy and never
    reaches the method (``ActivationMethod._is_weight``).
    """
    return nn.Sequential(OrderedDict(fc=nn.Linear(dim, rows + 1, bias=False, dtype=dtype)))


def seen(method: laser.ActivationMethod, model: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """What backward sees of each input (N, D) of ``probe``, all saved in one step of ``method``."""
    seen_inputs = []
    for x in inputs:
        model.zero_grad(set_to_none=True)
        with method:
            y = model(x)  # (N, N + 1)
        (y * torch.eye(*y.shape, dtype=y.dtype)).sum().backward()  # d/dW[:N] = x_hat, d/dW[N] = 0
        seen_inputs.append(model.fc.weight.grad[: len(x)].float().clone())
    method.step()
    return seen_inputs


def all_hooks(model: nn.Module) -> int:
    """Forward and forward-pre hooks left on any module of ``model``."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_always_called)
        for m in model.modules()
    )


def low_rank(rows: int, dim: int, rank: int, seed: int) -> torch.Tensor:
    """A random (rows, dim) matrix of the given rank."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, dim, generator=g)


# ----------------------------------------------------------------------------- protocol and errors


def test_registry_names() -> None:
    assert sorted(names()) == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_protocol(name: str) -> None:
    model = looped()
    assert all_hooks(model) == 0
    method = build(name, model, **OPTIONS[name])
    assert isinstance(method, laser.ActivationMethod) and method.name == name
    for seed in range(2):
        train_step(model, method, batch(seed))
    report = method.report()
    assert isinstance(report, laser.Report) and report.method == name and report.step == 1
    assert report.raw_bytes > 0 and report.sites
    if name == "none":
        assert report.stored_bytes == report.raw_bytes
    else:
        # every method saves a good share; laser's guarded policy keeps one of the block outputs raw (its own
        # fidelity is under the threshold: the block output of every recursion step is one site, one basis)
        assert 0.15 < report.savings < 1.0, str(report)
    for row in report.sites:
        assert 0.0 <= row.fidelity <= 1.0 + 1e-6
        assert sum(row.reasons.values()) == row.fallbacks <= row.tensors
        if row.dim == 0:  # no dense rows (SDPA's strided logsumexp): kept raw for its layout
            assert row.reasons == {"layout": row.tensors} and row.stored_bytes == row.raw_bytes
        else:
            assert 1 <= row.rank <= row.dim
    assert str(report).startswith(name)

    # Outside `with` nothing is hooked: the step's report stays the last one.
    model(batch(5)).sum().backward()
    assert method.report() is report

    method.load_state_dict(method.state_dict())
    method.remove()
    assert all_hooks(model) == 0
    with pytest.raises(RuntimeError, match="removed"), method:
        pass


def test_unknown_method_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown method 'nope'") as info:
        build("nope", looped())
    assert all(name in str(info.value) for name in ALL)


@pytest.mark.parametrize(
    ("name", "option", "listed"),
    [
        ("quant", "rank", "bits"),
        ("static", "bits", "rank"),
        ("sketch", "power_iters", "seed"),
        ("oracle", "x", "quantize"),
    ],
)
def test_unknown_option_names_the_valid_ones(name: str, option: str, listed: str) -> None:
    model = looped()
    with pytest.raises(ValueError, match=f"no option.*{option}.*valid options:.*{listed}"):
        build(name, model, **{option: 1})
    assert all_hooks(model) == 0  # fails before the model is touched


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("quant", {"bits": 3}, "bits=3 .*2, 4 or 8"),
        ("quant", {"group_size": 0}, "group_size=0"),
        ("static", {"rank": 0}, "rank=0 .*>= 1"),
        ("sketch", {"quantize": "int4"}, "quantize='int4' .*'int8'"),
        ("oracle", {"min_dim": 0}, "min_dim=0"),
    ],
)
def test_bad_values_raise(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_config(name, **options)


@pytest.mark.parametrize("name", ["quant", *PROJECTIONS])
def test_wrong_config_type_raises(name: str) -> None:
    method_type, _ = laser.methods.REGISTRY[name]
    with pytest.raises(TypeError, match="config must be"):
        method_type(looped(), laser.LaserConfig())


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group_size", [256, 100])
def test_quant_bytes(bits: int, group_size: int) -> None:
    rows, dim = 37, 48  # 1776 values: the last group is padded
    x = torch.randn(rows, dim)
    method = build("quant", probe(rows, dim), bits=bits, group_size=group_size)
    seen(method, method.model, x)
    groups = math.ceil(rows * dim / group_size)
    packed = math.ceil(groups * group_size * bits / 8)  # padded values, 8 // bits to a byte
    metadata = groups * 2 * 4  # fp32 minimum and scale per group
    row = method.report().site("fc/input:48")
    assert row.raw_bytes == rows * dim * 4
    assert row.stored_bytes == packed + metadata
    assert row.rank == dim and row.tensors == 1 and row.fallbacks == 0


@pytest.mark.parametrize("name", PROJECTIONS)
@pytest.mark.parametrize(
    ("dtype", "quantize", "code_bytes", "scale_bytes"),
    [(torch.float32, None, 4, 0), (torch.bfloat16, None, 2, 0), (torch.float32, "int8", 1, 4)],
)
def test_projection_bytes(name: str, dtype: torch.dtype, quantize: str | None, code_bytes: int,
                          scale_bytes: int) -> None:
    rows, dim, rank = 64, 48, 8
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(rows, dim, generator=g).to(dtype), torch.randn(rows, dim, generator=g).to(dtype)
    method = build(name, probe(rows, dim, dtype), rank=rank, quantize=quantize)
    seen(method, method.model, x1, x2)  # two tensors at one site in one step
    codes = rows * rank * code_bytes + rank * scale_bytes
    basis = dim * rank * 4  # fp32
    bases = 2 if name == "oracle" else 1  # the oracle pays a basis per tensor, the others one per site
    row = method.report().site("fc/input:48")
    assert row.raw_bytes == 2 * rows * dim * torch.finfo(dtype).bits // 8
    assert row.stored_bytes == 2 * codes + bases * basis
    assert row.rank == rank and row.tensors == 2 and row.fallbacks == 0


@pytest.mark.parametrize("name", PROJECTIONS)
def test_projection_below_break_even_stays_raw(name: str) -> None:
    rows, dim = 8, 48  # 8 x 8 codes + a 48 x 8 fp32 basis cost more than the 8 x 48 input
    x = torch.randn(rows, dim)
    method = build(name, probe(rows, dim), rank=8, min_numel=0)
    (x_hat,) = seen(method, method.model, x)
    row = method.report().site("fc/input:48")
    assert torch.equal(x_hat, x)
    assert row.stored_bytes == row.raw_bytes == rows * dim * 4 and row.fallbacks == 1
    assert row.rank == dim and row.fidelity == 1.0


@pytest.mark.parametrize("name", ["quant", *PROJECTIONS])
def test_non_finite_tensor_stays_raw(name: str) -> None:
    x = torch.randn(64, 48)
    x[3, 5] = float("nan")
    model = probe(64, 48)
    method = build(name, model, **({} if name == "quant" else {"rank": 8}))
    with method:
        model(x).sum().backward()
    row = method.report().site("fc/input:48")
    assert row.fallbacks == 1 and row.stored_bytes == row.raw_bytes == 64 * 48 * 4
    assert method.state_dict()["extra"].get("bases", {}) == {}  # no basis built from NaN


# ----------------------------------------------------------------------------- reconstruction


def quant_steps(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per element of ``x``, the quantization step of its group: (max - min) / (2**bits - 1)."""
    flat = x.reshape(-1)
    groups = math.ceil(flat.numel() / group_size)
    steps = torch.empty(groups)
    for g in range(groups):
        values = flat[g * group_size : (g + 1) * group_size]
        steps[g] = (values.max() - values.min()) / (2**bits - 1)
    return steps.repeat_interleave(group_size)[: flat.numel()].view_as(x)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(2, 40),
    dim=st.integers(8, 70),
    bits=st.sampled_from([8, 4, 2]),
    group_size=st.sampled_from([7, 64, 256]),
    stochastic=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quant_error_within_one_step(rows: int, dim: int, bits: int, group_size: int, stochastic: bool,
                                     seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g) * torch.rand(rows, 1, generator=g) * 10  # rows differ in scale
    method = build("quant", probe(rows, dim), bits=bits, group_size=group_size, stochastic=stochastic,
                   min_numel=0)
    (x_hat,) = seen(method, method.model, x)
    step = quant_steps(x, bits, group_size)
    bound = step if stochastic else step / 2
    assert bool(((x_hat - x).abs() <= bound * (1 + 1e-4) + 1e-6).all())
    cosine = float((x * x_hat).sum() / (x.norm() * x_hat.norm()))
    assert method.report().site(f"fc/input:{dim}").fidelity == pytest.approx(cosine, abs=1e-5)


def test_quant_stochastic_rounding_is_reproducible() -> None:
    x = torch.randn(32, 64)

    def run(seed: int) -> torch.Tensor:
        method = build("quant", probe(32, 64), bits=2, stochastic=True, seed=seed)
        return seen(method, method.model, x)[0]

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@settings(max_examples=25, deadline=None)
@given(rank=st.integers(1, 12), decay=st.floats(0.5, 0.95), seed=st.integers(0, 2**16))
def test_oracle_error_is_eckart_young(rank: int, decay: float, seed: int) -> None:
    rows, dim = 48, 32
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, dim, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    spectrum = decay ** torch.arange(dim, dtype=torch.float64)  # known singular values
    x = ((u * spectrum) @ v.T).float()
    method = build("oracle", probe(rows, dim), rank=rank)
    (x_hat,) = seen(method, method.model, x)
    tail = spectrum[rank:].square().sum().sqrt().item()
    assert (x_hat - x).norm().item() == pytest.approx(tail, rel=1e-3, abs=1e-5)
    kept = (spectrum[:rank].square().sum() / spectrum.square().sum()).sqrt().item()
    assert method.report().site("fc/input:32").fidelity == pytest.approx(kept, abs=1e-5)


def test_oracle_uses_a_basis_per_tensor() -> None:
    x1, x2 = low_rank(64, 48, 4, seed=1), low_rank(64, 48, 4, seed=2)  # two different rank-4 subspaces
    method = build("oracle", probe(64, 48), rank=4)
    for x, x_hat in zip((x1, x2), seen(method, method.model, x1, x2), strict=True):
        assert torch.allclose(x_hat, x, atol=1e-4 * x.abs().max().item())
    assert method.state_dict()["extra"]["bases"] == {}


def test_static_is_exact_on_its_first_batch_then_stale() -> None:
    x1, x2 = low_rank(64, 48, 5, seed=1), low_rank(64, 48, 5, seed=2)
    method = build("static", probe(64, 48), rank=8)
    (x_hat1,) = seen(method, method.model, x1)
    basis = method.state_dict()["extra"]["bases"]["fc/input:48"].clone()
    assert torch.allclose(x_hat1, x1, atol=1e-4 * x1.abs().max().item())
    (x_hat2,) = seen(method, method.model, x2)
    assert torch.equal(method.state_dict()["extra"]["bases"]["fc/input:48"], basis)  # never updated
    assert (x_hat2 - x2).norm() > 0.1 * x2.norm()  # another subspace: the static basis misses it
    assert torch.allclose(x_hat2, x2 @ basis @ basis.T, atol=1e-4 * x2.abs().max().item())
    kept = ((x2 @ basis).norm() / x2.norm()).item()  # a float: approx() cannot take a 0-d tensor
    assert method.report().site("fc/input:48").fidelity == pytest.approx(kept, abs=1e-5)


def test_sketch_is_data_independent() -> None:
    def sketch(x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        method = build("sketch", probe(64, 48), rank=8, seed=seed)
        (x_hat,) = seen(method, method.model, x)
        return x_hat, method.state_dict()["extra"]["bases"]["fc/input:48"]

    x1, x2 = low_rank(64, 48, 5, seed=1), torch.randn(64, 48) * 100
    (x_hat1, basis1), (x_hat2, basis2) = sketch(x1), sketch(x2)
    assert torch.equal(basis1, basis2)
    assert torch.allclose(basis1.T @ basis1, torch.eye(8), atol=1e-5)
    for x, x_hat in ((x1, x_hat1), (x2, x_hat2)):
        assert torch.allclose(x_hat, x @ basis1 @ basis1.T, atol=1e-4 * x.abs().max().item())
    assert (x_hat1 - x1).norm() > 0.1 * x1.norm()  # blind to the rank-5 structure static would catch
    assert not torch.allclose(sketch(x1, seed=1)[1], basis1)


def test_sketch_bases_differ_between_sites() -> None:
    model = nn.Sequential(OrderedDict(a=nn.Linear(48, 48), b=nn.Linear(48, 48)))
    method = build("sketch", model, rank=8)
    train_step(model, method, torch.randn(64, 48))
    bases = method.state_dict()["extra"]["bases"]
    assert not torch.allclose(bases["a/input:48"], bases["a/addmm:48"])  # b's input: a's output, named by a


# ----------------------------------------------------------------------------- gradients and state


@pytest.mark.parametrize("name", PROJECTIONS)
def test_full_rank_projection_matches_twin(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Break-even keeps full-rank codes raw; switch it off so the codes path itself is exercised.
    monkeypatch.setattr(projection, "pays", lambda *args: True)
    model = looped()
    twin = copy.deepcopy(model)
    method = build(name, model, rank=128, exact_qk=False)  # attention's q and k too: every codable storage
    got, expected = train_step(model, method, batch(0)), train_step(twin, None, batch(0))
    report = method.report()
    # Every storage the method was asked to encode is coded; raw are only those never admitted: the embed's
    # input and the head's output (512 values < min_numel), the norms' (B, L, 1) statistics (width 1 < min_dim)
    # and SDPA's (B, H, L) logsumexp, laid out with L outermost (no dense rows).
    reasons = Counter()
    for row in report.sites:
        reasons.update(row.reasons)
    assert reasons == {"too small": 2 + 4 * 3, "layout": 3} and report.stored_bytes > report.raw_bytes
    assert sum(row.fallbacks for row in report.sites) == 17
    for key, grad in expected.items():
        assert torch.allclose(got[key], grad, rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize("name", PROJECTIONS)
def test_rank_at_width_stays_raw_and_exact(name: str) -> None:
    model = looped()
    twin = copy.deepcopy(model)
    method = build(name, model, rank=128)
    got, expected = train_step(model, method, batch(0)), train_step(twin, None, batch(0))
    report = method.report()
    assert report.stored_bytes == report.raw_bytes
    assert all(torch.equal(got[key], grad) for key, grad in expected.items())


def test_quant_8bit_gradients_close_to_twin() -> None:
    model = looped()
    twin = copy.deepcopy(model)
    errors = {}
    for bits in (8, 2):
        method = build("quant", copy.deepcopy(model), bits=bits, exact_qk=False)  # quantize q and k as well
        got, expected = train_step(method.model, method, batch(0)), train_step(twin, None, batch(0))
        errors[bits] = max(((got[k] - g).norm() / g.norm()).item() for k, g in expected.items())
        assert method.report().savings > 0.7
    assert errors[8] < 0.02 and errors[2] > errors[8]


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip(name: str) -> None:
    model = looped()
    method = build(name, model, **OPTIONS[name])
    train_step(model, method, batch(0))
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    twin = copy.deepcopy(model)
    resumed = build(name, twin, **OPTIONS[name])
    resumed.load_state_dict(torch.load(buffer))
    got, expected = train_step(twin, resumed, batch(1)), train_step(model, method, batch(1))
    assert all(torch.equal(got[key], grad) for key, grad in expected.items())
    assert resumed.report().to_dict() == method.report().to_dict()
    if name in ("static", "sketch"):
        bases, resumed_bases = method.state_dict()["extra"]["bases"], resumed.state_dict()["extra"]["bases"]
        assert bases and sorted(bases) == sorted(resumed_bases)
        assert all(torch.equal(bases[site], resumed_bases[site]) for site in bases)


def test_state_of_another_method_is_refused() -> None:
    static = build("static", looped(), rank=8)
    with pytest.raises(ValueError, match="'static', not 'sketch'"):
        build("sketch", looped(), rank=8).load_state_dict(static.state_dict())


# ----------------------------------------------------------------------------- parameters


class ParamUser(nn.Module):
    """Saves parameters three ways: a linear's ``weight.t()``, a raw matmul operand, a scale; and a buffer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.gain = nn.Parameter(torch.rand(dim) + 0.5)
        self.register_buffer("mask", torch.rand(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)  # saves x (site lin/input:<dim>) and lin.weight.t()
        h = h @ self.weight  # saves the lin output and weight
        h = h * self.gain  # saves the matmul output and gain
        return h * self.mask  # saves the buffer only


@pytest.mark.parametrize("name", ALL)
def test_parameters_never_become_sites(name: str) -> None:
    rows, dim = 64, 16
    torch.manual_seed(0)
    model = ParamUser(dim)
    twin = copy.deepcopy(model)
    options = {**OPTIONS[name], "min_numel": 0, "min_dim": 1}  # admit anything that reaches the method
    method = build(name, model, **options)
    x = torch.randn(rows, dim, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    before = {key: t.clone() for key, t in model.state_dict().items()}
    with method:
        out = model(x)
    out.square().sum().backward()
    twin(x_twin).square().sum().backward()
    report = method.report()
    activation = rows * dim * 4
    assert {row.name: (row.tensors, row.raw_bytes) for row in report.sites} == {
        "lin/input:16": (1, activation),  # x
        "lin/addmm:16": (1, activation),  # the lin output (returned by lin), saved by the matmul
        "ParamUser/mm:16": (1, activation),  # the matmul output, saved by the product with gain
    }
    assert all(torch.equal(t, before[key]) for key, t in model.state_dict().items())
    # The input's gradient flows only through parameters and the buffer: exact if none was compressed.
    assert torch.allclose(x.grad, x_twin.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["none", "static"])
def test_parameters_never_become_sites_under_autocast(name: str) -> None:
    rows, dim = 64, 32
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(dim, dim), act=nn.GELU(), b=nn.Linear(dim, dim)))
    method = build(name, model, min_numel=0, min_dim=1, **({"rank": 8} if name == "static" else {}))
    x = torch.randn(rows, dim, requires_grad=True)
    with method, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    activation = rows * dim * 2  # bf16 copies of the inputs of a and b, and the GELU input
    assert method.report().raw_bytes == 3 * activation
