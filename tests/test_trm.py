"""Tests of the Tiny Recursive Model and its layers (laser.models.trm, laser.models.layers)."""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import laser
from laser.models.layers import (
    Attention,
    RotaryEmbedding,
    apply_rotary,
    grid_neighbours,
    local_heads_bias,
    rms_norm,
    swiglu_inter,
    trunc_normal_,
)
from laser.models.trm import PRESETS, TRM, TRMConfig, count_parameters, log_stablemax, preset

VOCAB = 5
PATH = 4


@pytest.fixture(autouse=True)
def one_thread():
    """Run these tests on one intra-op thread: on a shared 2-core machine, two spinning OpenMP threads
    competing with other processes make small kernels up to 100x slower; one thread is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> TRMConfig:
    """The "tiny" test preset with some fields changed."""
    return dataclasses.replace(preset("tiny"), **overrides)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random maze-like token ids (B, L)."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def count_saved(fn):
    """Run fn() and count the tensors autograd saves for backward (pack hook calls) outside any
    checkpoint region."""
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return count, out


# ---------------------------------------------------------------- shapes, sizes, presets


def test_forward_shapes_and_dtypes():
    torch.manual_seed(0)
    model = TRM(tiny())
    logits = model(tokens(3, 121))
    assert logits.shape == (3, 121, VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # Shorter sequences use the first positions of the RoPE table.
    assert model(tokens(2, 50)).shape == (2, 50, VOCAB)


def test_bf16_forward_returns_fp32_logits_and_halt_logits():
    torch.manual_seed(0)
    model = TRM(tiny(forward_dtype="bfloat16", act=True))
    carry, logits, halt = model.forward_carry(tokens(2, 121))
    assert logits.dtype == torch.float32 and logits.shape == (2, 121, VOCAB)
    assert halt is not None and halt.shape == (2,) and halt.dtype == torch.float32
    assert carry.y.dtype == torch.bfloat16 and carry.z.shape == (2, 121, 32)
    # The halting head starts at weight 0, bias -5, as in the reference.
    assert torch.allclose(halt, torch.full((2,), -5.0))


def test_learned_positions_when_rope_is_off():
    torch.manual_seed(0)
    with_rope, without = TRM(tiny()), TRM(tiny(rope=False))
    assert count_parameters(without) - count_parameters(with_rope) == 121 * 32
    logits = without(tokens(2, 121))
    assert logits.shape == (2, 121, VOCAB) and torch.isfinite(logits).all()


def test_swiglu_inter_width():
    assert swiglu_inter(512, 4.0) == 1536  # 2/3 * 2048 = 1365.3 -> next multiple of 256
    assert swiglu_inter(256, 4.0) == 768  # 682.7 -> 683 -> 768
    assert swiglu_inter(768, 4.0) == 2048  # exactly 2048
    assert swiglu_inter(32, 4.0) == 256  # small widths round up to one 256 block


def test_paper_preset_parameter_count():
    cfg = preset("paper")
    assert (cfg.hidden, cfg.heads, cfg.expansion, cfg.L_layers, cfg.H_cycles, cfg.L_cycles) == (
        512, 8, 4.0, 1, 1, 24,
    )
    assert (cfg.seq_len, cfg.vocab, cfg.rope, cfg.rope_theta) == (121, 5, True, 10000.0)
    model = TRM(cfg)
    V, D, I = 5, 512, 1536
    expected = V * D + D * 3 * D + D * D + D * 2 * I + I * D + D * V  # embed, qkv, o, gate_up, down, head
    assert expected == 3_412_992
    assert count_parameters(model) == expected
    assert abs(expected - 3.4e6) / 3.4e6 < 0.01  # the paper's "~3.4M"
    names = {name for name, _ in model.named_parameters()}
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.o.weight", "blocks.0.mlp.gate_up.weight",
            "blocks.0.mlp.down.weight", "embed.weight", "head.weight"} == names
    assert model.get_submodule("blocks.0.mlp.gate_up").weight.shape == (2 * I, D)
    # The initial states are buffers, not parameters; the RoPE tables are not saved.
    assert set(model.state_dict()) == names | {"y_init", "z_init"}
    assert model.y_init.shape == model.z_init.shape == (D,)


def test_presets():
    assert set(PRESETS) == {"paper", "paper-cpu", "quick", "tiny"}
    for name in PRESETS:
        assert isinstance(preset(name), TRMConfig)
    copy = preset("quick")
    copy.hidden = 999
    assert preset("quick").hidden != 999  # preset() hands out copies
    with pytest.raises(ValueError, match="paper-cpu"):
        preset("huge")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden": 30, "heads": 4}, "heads"),
        ({"hidden": 6, "heads": 2}, "even"),  # head dim 3 cannot pair channels for RoPE
        ({"L_cycles": 0}, "L_cycles"),
        ({"H_cycles": -1}, "H_cycles"),
        ({"n_sup": 0}, "n_sup"),
        ({"L_layers": 0}, "L_layers"),
        ({"vocab": 1}, "vocab"),
        ({"seq_len": 0}, "seq_len"),
        ({"expansion": 0.0}, "expansion"),
        ({"path_weight": -1.0}, "path_weight"),
        ({"rope_theta": float("nan")}, "rope_theta"),
        ({"forward_dtype": "float8"}, "forward_dtype"),
        ({"hidden": 64.0}, "hidden"),
        ({"rope_2d": True, "seq_len": 120}, "rope_2d"),  # not a square grid
        ({"rope_2d": True, "hidden": 24, "heads": 4}, "rope_2d"),  # head dim 6: no row and column pairs
        ({"rope_2d": True, "rope": False}, "rope_2d"),
        ({"local_heads": 9}, "local_heads"),  # the default has 8 heads
        ({"local_heads": -1}, "local_heads"),
        ({"local_heads": True}, "local_heads"),
        ({"local_heads": 1, "seq_len": 120}, "square"),
    ],
)
def test_invalid_config_raises(overrides, field):
    with pytest.raises(ValueError, match=field):
        TRMConfig(**overrides)


def test_odd_head_dim_is_fine_without_rope():
    assert TRMConfig(hidden=6, heads=2, rope=False).head_dim == 3


def test_bad_inputs_raise():
    model = TRM(tiny())
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(2, 121))
    with pytest.raises(ValueError, match="seq_len"):
        model(tokens(1, 122))


# ---------------------------------------------------------------- recursion structure


def test_blocks_are_weight_tied_and_called_every_step():
    cfg = tiny(L_layers=2, H_cycles=2, L_cycles=3, n_sup=2)
    model = TRM(cfg)
    assert len(model.blocks) == 2
    calls = {name: 0 for name in ("blocks.0", "blocks.1", "blocks.0.mlp.gate_up", "blocks.1.attn.qkv")}

    def counter(name):
        def hook(module, args, output):
            calls[name] += 1

        return hook

    for name in calls:
        model.get_submodule(name).register_forward_hook(counter(name))
    model(tokens(1, 121))
    # per net call every block runs once; per cycle L_cycles + 1 net calls; H_cycles cycles; n_sup steps
    expected = 2 * 2 * (3 + 1)
    assert calls == dict.fromkeys(calls, expected)
    # Depth does not add parameters.
    assert count_parameters(TRM(tiny(L_cycles=7))) == count_parameters(TRM(tiny(L_cycles=1)))


def test_no_grad_cycles_save_no_tensors():
    x = tokens(2, 121)
    torch.manual_seed(0)
    one, _ = count_saved(lambda: TRM(tiny(H_cycles=1))(x))
    torch.manual_seed(0)
    two, _ = count_saved(lambda: TRM(tiny(H_cycles=2))(x))
    torch.manual_seed(0)
    deeper, _ = count_saved(lambda: TRM(tiny(H_cycles=1, L_cycles=3))(x))
    assert one > 0
    assert two == one
    assert deeper > one  # the count does see each grad step


def weight_copies_saved(model: TRM, x: torch.Tensor) -> set:
    """Storages of the bf16 weight copies autograd saves during one forward under CPU bf16 autocast."""
    weights = {id(p) for p in model.parameters()}
    storages = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        node = t.grad_fn
        while node is not None and node.next_functions:  # a cast's chain back to its parameter
            node = node.next_functions[0][0]
        if node is not None and id(getattr(node, "variable", None)) in weights and t.dtype == torch.bfloat16:
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        model(x)
    return storages


def test_autocast_casts_each_weight_once_per_forward_whatever_the_depth():
    x = tokens(2, 121)
    torch.manual_seed(0)
    shallow = weight_copies_saved(TRM(tiny(L_cycles=1)), x)
    torch.manual_seed(0)
    deep = weight_copies_saved(TRM(tiny(L_cycles=4)), x)
    assert shallow and len(deep) == len(shallow)  # one cached copy per weight, not one per recursion step


def test_earlier_supervision_steps_in_forward_save_no_tensors():
    x = tokens(2, 121)
    torch.manual_seed(0)
    one, _ = count_saved(lambda: TRM(tiny(n_sup=1))(x))
    torch.manual_seed(0)
    three, _ = count_saved(lambda: TRM(tiny(n_sup=3))(x))
    assert three == one


def test_checkpointing_matches_and_saves_less():
    torch.manual_seed(0)
    plain = TRM(tiny(L_cycles=3, L_layers=2))
    ckpt = TRM(tiny(L_cycles=3, L_layers=2, checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    x, y = tokens(2, 121, seed=1), tokens(2, 121, seed=2)
    saved_plain, logits_plain = count_saved(lambda: plain(x))
    saved_ckpt, logits_ckpt = count_saved(lambda: ckpt(x))
    assert torch.allclose(logits_plain, logits_ckpt, atol=1e-6)
    plain.loss(logits_plain, y).backward()
    ckpt.loss(logits_ckpt, y).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name
    assert saved_ckpt < saved_plain / 4


def test_checkpoint_inputs_saved_by_forward_carry_belong_to_the_model():
    # The per-step inputs activation checkpointing keeps are saved at the model's own level; a training
    # loop calling forward_carry must see them as the model's ("TRM/<op>:D", or the block that returned them),
    # which a compressor codes, not as tensors saved outside it (kept raw by model_only).
    import laser

    torch.manual_seed(0)
    cfg = tiny(checkpoint=True)
    model = TRM(cfg)
    comp = laser.Compressor(model, laser.LaserConfig(rank=8, min_numel=0, policy="paper"))
    for _ in range(2):
        with comp:
            _, logits, _ = model.forward_carry(tokens(4, 121))
            loss = model.loss(logits, tokens(4, 121, seed=1))
        loss.backward()
        comp.step()
    names = {s.name: s for s in comp.report().sites}
    # Per net call checkpoint keeps one input, h + injection, made at the model's level: z + (y + x) for each
    # latent update, y + z for the answer update. The new answer y, the last block's output (made by the final
    # norm's product), is saved by the head.
    inputs = names[f"TRM/add:{cfg.hidden}"]
    answer = names[f"blocks.{cfg.L_layers - 1}/mul:{cfg.hidden}"]
    assert inputs.tensors == cfg.L_cycles + 1 and answer.tensors == 1
    for root in (inputs, answer):
        assert root.fallbacks == 0 and root.stored_bytes < root.raw_bytes
    assert not [name for name in names if name.startswith("<outside>/") and name.endswith(f":{cfg.hidden}")]


def test_forward_carry_detaches_and_steps_train_separately():
    torch.manual_seed(0)
    model = TRM(tiny(n_sup=2))
    x, y = tokens(2, 121, seed=1), tokens(2, 121, seed=2)
    carry, logits, halt = model.forward_carry(x)
    assert halt is None
    assert not carry.y.requires_grad and not carry.z.requires_grad
    assert carry.y.grad_fn is None and carry.z.grad_fn is None
    assert logits.requires_grad
    model.loss(logits, y).backward()
    carry2, logits2, _ = model.forward_carry(x, carry)
    model.loss(logits2, y).backward()  # a second backward works: the graphs do not share nodes
    assert not torch.allclose(carry2.y, carry.y)
    # forward() equals running the supervision steps through the carry.
    with torch.no_grad():
        assert torch.allclose(model(x), logits2, atol=1e-6)


def test_paper_preset_train_step_on_cpu():
    torch.manual_seed(0)
    model = TRM(preset("paper"))
    x, y = tokens(1, 121, seed=1), tokens(1, 121, seed=2)
    start = time.perf_counter()
    loss = model.loss(model(x), y)
    loss.backward()
    elapsed = time.perf_counter() - start
    assert math.isfinite(loss.item())
    # A random 5-way guess costs about log 5 per token.
    assert 0.5 * math.log(5) < loss.item() < 3 * math.log(5)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert elapsed < 60  # about 2 s on an idle 2-core CPU


# ---------------------------------------------------------------- losses


def test_loss_weights_path_cells():
    model = TRM(tiny(path_weight=3.0))
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.5, 0.0, -1.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 4, 4]])

    def ce(row, target):
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    rows = logits[0].tolist()
    per_cell = [ce(rows[0], 0), ce(rows[1], 4), ce(rows[2], 4)]
    expected = (1 * per_cell[0] + 3 * per_cell[1] + 3 * per_cell[2]) / (1 + 3 + 3)
    assert model.loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    # With weight 1 it is the plain token mean.
    plain = TRM(tiny()).loss(logits, targets).item()
    assert plain == pytest.approx(sum(per_cell) / 3, rel=1e-6)
    # A data-parallel rank divides by the global weight share instead of its own slice's weight.
    shared = model.loss(logits, targets, normalizer=10.0).item()
    assert shared == pytest.approx((1 * per_cell[0] + 3 * per_cell[1] + 3 * per_cell[2]) / 10.0, rel=1e-6)


def test_log_stablemax_by_hand():
    # s(0) = 1, s(1) = 2, s(-1) = 1/2: probabilities 1/3.5, 2/3.5, 0.5/3.5
    got = log_stablemax(torch.tensor([0.0, 1.0, -1.0])).exp()
    assert torch.allclose(got, torch.tensor([1 / 3.5, 2 / 3.5, 0.5 / 3.5], dtype=torch.float64))


def test_stablemax_loss_is_finite_for_huge_logits():
    model = TRM(tiny(stablemax=True))
    logits = torch.tensor([[[1e30, -1e30, 0.0, 3.0, 1e4]] * 3], requires_grad=True)
    targets = torch.tensor([[1, 0, 4]])
    loss = model.loss(logits, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_halting_loss():
    model = TRM(tiny(act=True))
    logits = torch.zeros(2, 3, VOCAB)
    logits[0, :, 1] = 5.0  # sequence 0 predicts all 1s: solved; sequence 1 predicts 1s against 2s: not
    targets = torch.tensor([[1, 1, 1], [2, 2, 2]])
    halt = torch.tensor([0.3, -0.7])
    token_only = TRM(tiny()).loss(logits, targets).item()

    def bce(z, t):
        p = 1 / (1 + math.exp(-z))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    expected = token_only + 0.5 * (bce(0.3, 1) + bce(-0.7, 0)) / 2
    assert model.loss(logits, targets, halt).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="halt_logits"):
        model.loss(logits, targets)


# ---------------------------------------------------------------- layers


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-2, 1e3), dim=st.sampled_from([8, 64, 512]))
def test_rms_norm_gives_unit_rms(seed, scale, dim):
    x = torch.randn(4, 7, dim, generator=torch.Generator().manual_seed(seed)) * scale
    out = rms_norm(x, eps=1e-5).double()
    # Independent float64 reference: x / sqrt(mean square + eps), a positive rescaling of each row.
    x64 = x.double()
    assert torch.allclose(out, x64 / (x64.square().mean(-1, keepdim=True) + 1e-5).sqrt(), rtol=1e-5, atol=1e-6)
    if scale >= 1:  # eps is negligible: unit RMS
        rms = out.square().mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)


def test_rms_norm_keeps_low_precision_dtype():
    x = torch.randn(3, 16).to(torch.bfloat16) * 100
    out = rms_norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float().square().mean(-1), torch.ones(3), atol=2e-2)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), head_dim=st.sampled_from([2, 8, 64]))
def test_rope_preserves_norms(seed, head_dim):
    rotary = RotaryEmbedding(head_dim, max_len=40)
    x = torch.randn(2, 40, 3, head_dim, generator=torch.Generator().manual_seed(seed))  # (B, L, H, hd)
    out = apply_rotary(x, *rotary(40))
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(out[:, 0], x[:, 0])  # position 0 is not rotated


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    head_dim=st.sampled_from([2, 8, 64]),
    m=st.integers(0, 60),
    n=st.integers(0, 60),
    shift=st.integers(0, 60),
)
def test_rope_scores_depend_on_relative_position(seed, head_dim, m, n, shift):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)
    rotary = RotaryEmbedding(head_dim, max_len=121)
    cos, sin = rotary(121)

    def at_every_position(v):
        return apply_rotary(v.expand(1, 121, 1, head_dim), cos, sin)[0, :, 0]  # (L, hd)

    rq, rk = at_every_position(q), at_every_position(k)
    scale = q.norm() * k.norm()
    assert abs(rq[m] @ rk[n] - rq[m + shift] @ rk[n + shift]) <= 1e-4 * scale


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    head_dim=st.sampled_from([4, 8, 16]),
    cells=st.lists(st.integers(0, 6), min_size=6, max_size=6),
)
def test_rope_2d_scores_depend_on_grid_offset(seed, head_dim, cells):
    # Two query/key pairs with the same (row, column) offset score alike, whatever their flat distance.
    r1, c1, r2, c2, dr, dc = cells
    side = 7 + 6  # room for every offset the strategy draws
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)
    cos, sin = RotaryEmbedding(head_dim, max_len=side * side, theta=100.0, grid=side)(side * side)

    def at_every_position(v):
        return apply_rotary(v.expand(1, side * side, 1, head_dim), cos, sin)[0, :, 0]  # (L, hd)

    rq, rk = at_every_position(q), at_every_position(k)
    cell = lambda row, col: row * side + col  # noqa: E731
    first = rq[cell(r1 + dr, c1 + dc)] @ rk[cell(r1, c1)]
    second = rq[cell(r2 + dr, c2 + dc)] @ rk[cell(r2, c2)]
    assert abs(first - second) <= 1e-4 * q.norm() * k.norm()


def test_rope_2d_rows_and_columns_rotate_separate_channels():
    cos, _ = RotaryEmbedding(8, max_len=9, grid=3)(9)
    # hd 8: channels 0 and 4 rotate with the row at frequency 1, channels 2 and 6 with the column.
    rows, cols = torch.arange(9) // 3, torch.arange(9) % 3
    assert torch.allclose(cos[:, 0], rows.float().cos()) and torch.allclose(cos[:, 4], rows.float().cos())
    assert torch.allclose(cos[:, 2], cols.float().cos()) and torch.allclose(cos[:, 6], cols.float().cos())
    with pytest.raises(ValueError, match="grid"):
        RotaryEmbedding(8, max_len=10, grid=3)
    with pytest.raises(ValueError, match="divisible by 4"):
        RotaryEmbedding(6, max_len=9, grid=3)


def test_rope_tables_are_not_persistent():
    assert RotaryEmbedding(8, 10).state_dict() == {}
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7, 10)


def test_trunc_normal_matches_jax_definition():
    std = 0.05
    x = trunc_normal_(torch.empty(400_000), std=std)
    # The truncated distribution itself has the requested std; the cut is at 2 std of the
    # untruncated normal, whose std is std / std(standard normal truncated to [-2, 2]).
    underlying = std / scipy.stats.truncnorm.std(-2, 2)
    assert x.std().item() == pytest.approx(std, rel=0.01)
    assert x.abs().max().item() <= 2 * underlying * (1 + 1e-6)
    assert x.abs().max().item() > 1.95 * underlying
    assert x.mean().abs().item() < 3 * std / math.sqrt(x.numel())


def test_linear_init_is_lecun():
    torch.manual_seed(0)
    model = TRM(preset("paper"))
    down = model.get_submodule("blocks.0.mlp.down").weight  # fan_in 1536
    assert down.std().item() == pytest.approx(1 / math.sqrt(1536), rel=0.02)
    qkv = model.get_submodule("blocks.0.attn.qkv").weight  # fan_in 512
    assert qkv.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.02)
    # Embedded tokens have unit scale: weight std 1/sqrt(D), multiplied by sqrt(D).
    assert model.embed(torch.arange(5)).std().item() == pytest.approx(1.0, rel=0.1)


# ----------------------------------------------------------------------------------------- local heads
@settings(max_examples=20, deadline=None)
@given(side=st.integers(1, 9))
def test_grid_neighbours_are_the_cell_and_its_four_neighbours(side):
    got = grid_neighbours(side)
    for a in range(side * side):
        for b in range(side * side):
            (ra, ca), (rb, cb) = divmod(a, side), divmod(b, side)
            assert bool(got[a, b]) == (abs(ra - rb) + abs(ca - cb) <= 1)
    assert got.sum() == side * side + 4 * side * (side - 1)  # self + both directions of every grid edge


def _identity_out(attn: Attention) -> Attention:
    """The attention with its output projection set to the identity: the output is the heads' outputs
    side by side."""
    with torch.no_grad():
        attn.o.weight.copy_(torch.eye(attn.o.in_features))
    return attn


def test_local_heads_read_only_the_cell_and_its_neighbours():
    # 2 heads of width 4 on a 4x4 grid; head 0 local, head 1 global. Cell 5 = (1, 1): neighbours 1, 4, 6, 9.
    torch.manual_seed(0)
    attn = _identity_out(Attention(8, 2, bias=local_heads_bias(4, heads=2, local=1)))
    x = torch.randn(3, 16, 8, requires_grad=True)
    out = attn(x)
    grad = torch.autograd.grad(out[:, 5, :4].sum(), x)[0]  # the local head's output at cell 5
    reads = grad.abs().sum(dim=(0, 2)) > 0
    assert reads.nonzero().flatten().tolist() == [1, 4, 5, 6, 9]
    grad_global = torch.autograd.grad(attn(x)[:, 5, 4:].sum(), x)[0]
    assert (grad_global.abs().sum(dim=(0, 2)) > 0).all()  # the global head reads every cell


def test_local_heads_bias_rejects_bad_shapes():
    with pytest.raises(ValueError, match="side"):
        grid_neighbours(0)
    with pytest.raises(ValueError, match="local heads"):
        local_heads_bias(4, heads=2, local=3)
    with pytest.raises(ValueError, match="bias"):
        Attention(8, 2, bias=local_heads_bias(4, heads=4, local=1))  # 4 heads of bias for 2 heads
    with pytest.raises(ValueError, match="causal"):
        Attention(8, 2, causal=True, bias=local_heads_bias(4, heads=2, local=1))


def test_local_heads_model_trains_and_laser_at_full_rank_equals_the_twin():
    torch.manual_seed(0)
    model = TRM(tiny(seq_len=16, local_heads=1))
    assert model.state_dict().keys() == TRM(tiny(seq_len=16)).state_dict().keys()  # the bias is not saved
    twin = copy.deepcopy(model)
    inputs, targets = tokens(4, 16), tokens(4, 16, seed=1)
    comp = laser.Compressor(model, laser.LaserConfig(rank=256, max_rank=256, min_numel=0))
    with comp:
        model.loss(model(inputs), targets).backward()
    twin.loss(twin(inputs), targets).backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
    # The local head changes the model: the same weights without it give other logits.
    plain = TRM(tiny(seq_len=16))
    plain.load_state_dict(twin.state_dict())
    assert not torch.allclose(plain(inputs), twin(inputs))


def test_local_heads_keep_attention_on_the_fused_kernel():
    # The math fallback of CPU attention would save the (B, H, L, L) probabilities of every call.
    model = TRM(tiny(seq_len=16, hidden=24, local_heads=1))  # head dim 12: q, k, v are (3, 2, 16, 12)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens(3, 16))
    assert shapes and (3, 2, 16, 16) not in shapes


def test_local_heads_under_autocast_save_one_mask_for_every_call():
    # A cast of the fp32 bias per call would keep one (1, H, L, L) copy per recursion step.
    model = TRM(tiny(seq_len=16, hidden=24, local_heads=1, L_cycles=3))
    masks = []

    def pack(t):
        if t.shape == (1, 2, 16, 16):
            masks.append(t.untyped_storage().data_ptr())
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens(3, 16)).float().sum().backward()
    assert len(masks) == 4 and len(set(masks)) == 1  # 3 latent updates + 1 answer update, one storage
    assert TRMConfig(seq_len=121).side == 11 and TRMConfig(seq_len=120).side is None
