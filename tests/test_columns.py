"""A storage of which attention saves only the value slice (a fused qkv output whose q and k went through
RoPE) is coded over those columns alone; other views of it stay exact."""

import gc

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import laser
from laser.hooks import Reason, view_columns
from laser.methods.projection import LowRankCodes


class FusedAttention(nn.Module):
    """q and k are new storages (scaled, as RoPE would make them); v stays a view of the qkv output."""

    def __init__(self, dim: int = 16, heads: int = 2, read_query: bool = False) -> None:
        super().__init__()
        self.heads, self.read_query = heads, read_query
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if read_query:
            self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x)
        q, k, v = (t.view(B, L, self.heads, -1).transpose(1, 2) for t in qkv.split(D, dim=-1))
        out = F.scaled_dot_product_attention(q * 2.0, k * 2.0, v)  # (B, H, L, hd)
        out = out.transpose(1, 2).reshape(B, L, D)
        if self.read_query:  # a later op saves the q columns of the coded storage: they are not in its codes
            out = out + qkv[..., :D] * self.scale
        return out


def _grads(model: nn.Module, x: torch.Tensor, comp: laser.Compressor | None) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with comp if comp is not None else torch.enable_grad():
        loss = model(x).pow(2).sum()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_view_columns_of_value_slice_and_whole_rows():
    qkv = torch.zeros(2, 5, 48)
    v = qkv[..., 32:].view(2, 5, 2, 8).transpose(1, 2)
    assert view_columns(v, 48) == (32, 48, 48)
    assert view_columns(qkv, 48) is None  # whole rows
    assert view_columns(qkv[:, ::2], 48) is None  # every other row, whole rows
    assert view_columns(qkv.transpose(1, 2), 48) is None  # not a column block of rows of 48


def _rank4(*shape: int) -> torch.Tensor:
    """Rows in a 4-dimensional subspace: the value rows (x @ W_v^T) are rank 4 too, so rank-8 codes are exact."""
    return torch.randn(*shape[:-1], 4) @ torch.randn(4, shape[-1])


def test_value_slice_coded_alone_and_exact_on_low_rank_rows():
    torch.manual_seed(0)
    model, x = FusedAttention(), _rank4(3, 12, 16)
    exact = _grads(model, x, None)
    comp = laser.Compressor(model, laser.LaserConfig(rank=8, min_numel=0, policy="paper"))
    for _ in range(2):
        got = _grads(model, x, comp)
        comp.step()
    for g, e in zip(got, exact, strict=True):
        assert (g - e).norm() <= 1e-5 * e.norm()  # float rounding of rank-8 codes of rank-4 rows
    site = comp.report().site("qkv/mm:16")  # the value's 16 columns, not the 48 of the storage
    assert site.dim == 16 and site.raw_bytes == 3 * 12 * 48 * 4
    assert site.fidelity > 0.9999 and site.rank == 8
    # codes of N rows at rank 8 (the storage's 48-wide rows are gone) plus the 16 x 8 basis
    assert site.stored_bytes - site.state_bytes == 3 * 12 * 8 * 4 + 16 * 8 * 4


def test_low_rank_value_slice_matches_its_reconstruction_and_frees_the_storage():
    torch.manual_seed(0)
    model, x = FusedAttention(dim=32, heads=4), torch.randn(4, 16, 32)
    comp = laser.Compressor(model, laser.LaserConfig(rank=4, min_numel=0, policy="paper"))
    _grads(model, x, comp)
    comp.step()
    refs = []
    original = model.qkv.forward

    def keep_ref(inp):
        out = original(inp)
        refs.append(StorageWeakRef(out.untyped_storage()))
        return out

    model.qkv.forward = keep_ref
    with comp:
        loss = model(x).pow(2).sum()
    gc.collect()
    assert refs[0].expired()  # only the value's codes are kept, not the qkv output
    loss.backward()
    site = comp.report().site("qkv/mm:32")
    assert 0.0 < site.fidelity < 1.0 and site.rank == 4


def test_a_later_view_outside_the_coded_columns_is_kept_exact():
    torch.manual_seed(0)
    model, x = FusedAttention(read_query=True), _rank4(3, 12, 16)
    exact = _grads(model, x, None)
    comp = laser.Compressor(model, laser.LaserConfig(rank=8, min_numel=0, policy="paper"))
    got = _grads(model, x, comp)
    for g, e in zip(got, exact, strict=True):
        assert (g - e).norm() <= 1e-5 * e.norm()  # float rounding of rank-8 codes of rank-4 rows
    assert comp.report().site("qkv/mm:16").reasons[Reason.LAYOUT] == 1


class _GatedMLP(nn.Module):
    """SwiGLU on a fused gate/up output: silu saves the gate half, the product saves the up half."""

    def __init__(self, dim: int = 16, inter: int = 24) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * inter, bias=False)
        self.down = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def test_halves_of_a_coded_storage_decode_by_their_own_columns(monkeypatch):
    torch.manual_seed(0)
    model = _GatedMLP()
    x = torch.randn(4, 9, 16)
    config = laser.LaserConfig(rank=4, min_numel=0, policy="paper")
    seen = []
    unpack = laser.hooks.ActivationMethod._unpack

    def spy(self, packed):
        out = unpack(self, packed)
        if packed.tensor is None and not packed.factored():
            seen.append((packed.column_block() is not None, packed.entry.record.views, tuple(out.shape)))
        return out

    monkeypatch.setattr(laser.hooks.ActivationMethod, "_unpack", spy)
    got = _grads(model, x, laser.Compressor(model, config))
    halves = [s for s in seen if s[2] == (4, 9, 24) and s[0]]
    # silu's gate and the product's up: each rebuilt from its own 24 columns; the record counts no whole view,
    # so no decode of all 48 columns is held for them.
    assert len(halves) == 2 and all(views == 0 for _, views, _ in halves)
    monkeypatch.setattr(LowRankCodes, "column_decode", False)
    whole = _grads(model, x, laser.Compressor(model, config))  # the same codes, decoded whole and sliced
    for g, w in zip(got, whole, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
