"""Budget mode on models whose answer is known: which site must be protected, which rank each site needs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import laser


class TwoSites(nn.Module):
    """Two linears: ``low`` sees an exactly rank-4 input (rank 4 codes it exactly), ``full`` a full-rank one
    (rank 4 loses most of it)."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.low, self.full = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.low(a).square().mean() + self.full(b).square().mean()


def problem():
    torch.manual_seed(0)
    d, n = 64, 512
    model = TwoSites(d)
    a, b = torch.randn(n, 4) @ torch.randn(4, d) / 2, torch.randn(n, d)  # entries of variance 1 both
    return model, (lambda m: m(a, b))


def test_a_gradient_floor_protects_exactly_the_site_that_breaks_it():
    model, loss_fn = problem()
    config = laser.LaserConfig(rank=4, min_numel=0, policy="paper")
    unprotected = laser.plan(model, loss_fn, laser.Target(max_error=0.999), config)  # every site coded
    assert unprotected.measured.cosine < 0.99
    plan = laser.plan(model, loss_fn, laser.Target(grad_cosine=0.99), config)
    # full's input and its output (saved by the square) are full rank; low's are rank 4 and stay coded at 4.
    # The weight gradient reads full's input: protected. The square's gradient, 2 y, forgives more: rank 16.
    assert set(plan.protected) == {"full/input:64"} and set(plan.raised) == {"full/addmm:64"}
    assert plan.raised["full/addmm:64"][0] == 16 and plan.config.rank_for("low/input:64") == 4
    assert all(cosine < 0.99 for cosine in plan.protected.values())
    assert plan.measured.cosine >= 0.99 and plan.measured.stored_fraction < 1.0  # low/ still coded
    assert "protected full/input:64" in str(plan)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was


def test_a_gradient_floor_raises_the_rank_a_site_needs_before_protecting_it():
    torch.manual_seed(0)
    d, n = 64, 512
    model = TwoSites(d)
    a, b = torch.randn(n, 8) @ torch.randn(8, d) / 3, torch.randn(n, d)  # low's input: exactly rank 8
    config = laser.LaserConfig(rank=4, min_numel=0, policy="paper", threshold=0.01)  # no expansion by itself
    plan = laser.plan(model, lambda m: m(a, b), laser.Target(grad_cosine=0.99), config)
    # rank 4 cannot hold low's rank-8 input; rank 8 holds it exactly: raised once, never protected
    assert plan.raised["low/input:64"][0] == 8 and plan.raised["low/input:64"][1] < 0.99
    assert plan.config.rank_for("low/input:64") == 8 and "low/input:64" not in plan.protected
    assert "full/input:64" in plan.protected  # full rank: no rank under D/2 holds it
    assert plan.measured.cosine >= 0.99 and plan.measured.stored_fraction < 1.0
    assert "rank 8 at low/input:64" in str(plan)
    comp = laser.Compressor(model, plan.config)
    with comp:
        model(a, b).backward()
    rows = {row.name: row for row in comp.report().sites}
    assert rows["low/input:64"].rank == 8 and rows["low/input:64"].fidelity > 0.9999
    comp.remove()
    capped = laser.plan(model, lambda m: m(a, b), laser.Target(grad_cosine=0.99),
                        dataclasses.replace(config, max_rank=4))  # the user's ceiling: protect, never raise past it
    assert "low/input:64" in capped.protected and not capped.raised and capped.measured.cosine >= 0.99


def test_site_ranks_pick_the_first_matching_entry_and_bad_entries_name_the_fix():
    cfg = laser.LaserConfig(rank=32, site_ranks="*mlp.down*=64; blocks.0*=16")
    assert cfg.site_ranks == ("*mlp.down*=64", "blocks.0*=16")
    assert cfg.rank_for("blocks.0.mlp.down/mul:256") == 64 and cfg.rank_for("blocks.0/add:64") == 16
    assert cfg.rank_for("blocks.1/add:64") == 32 and cfg.largest_rank == 64
    assert cfg.rank_ceiling("blocks.0/add:64") == 64 and cfg.rank_ceiling("x:64") == 128  # 4 x the site's rank
    assert cfg.sample_size == 1024 and laser.LaserConfig(rank=8, site_ranks=("a=600",)).sample_size == 1200
    assert laser.ProjectionConfig(rank=8, site_ranks=("a*=2",)).rank_for("ab") == 2
    for bad in ("*mlp*", "*mlp*=0", "=4", "*mlp*=x"):
        with pytest.raises(ValueError, match="site_ranks.*'pattern=rank'"):
            laser.LaserConfig(site_ranks=bad)
    with pytest.raises(ValueError, match="max_rank=32 .*largest starting rank \\(64"):
        laser.LaserConfig(rank=32, max_rank=32, site_ranks="a=64")


def test_int8_codes_raise_the_rank_fp32_codes_would_protect():
    # Raising full's input to rank 32 stores half its raw bytes with fp32 codes (protected instead), an eighth
    # and the basis with int8 codes: there it is raised, and the plan keeps fewer bytes.
    model, loss_fn = problem()
    fp32 = laser.plan(model, loss_fn, laser.Target(grad_cosine=0.99),
                      laser.LaserConfig(rank=4, min_numel=0, policy="paper"))
    int8 = laser.plan(model, loss_fn, laser.Target(grad_cosine=0.99),
                      laser.LaserConfig(rank=4, min_numel=0, policy="paper", quantize="int8"))
    assert "full/input:64" in fp32.protected and not int8.protected
    assert int8.raised["full/input:64"][0] == 32 and int8.config.rank_for("full/input:64") == 32
    assert int8.measured.cosine >= 0.99 and int8.measured.stored_fraction < fp32.measured.stored_fraction
    int8_config = laser.LaserConfig(rank=4, min_numel=0, policy="paper", quantize="int8")
    full = laser.plan(model, loss_fn, laser.Target(grad_cosine=0.999), int8_config)
    assert full.raised["full/input:64"][0] == 64 and not full.protected  # int8 codes grow to the full width
    exact = laser.plan(model, loss_fn, laser.Target(grad_cosine=1.0), int8_config)
    # int8 rounding never reaches a cosine of 1: each site, at full width with nowhere to grow, is protected
    assert set(exact.protected) == {"low/input:64", "low/addmm:64", "full/input:64", "full/addmm:64"}
    assert not exact.raised and exact.measured.stored_fraction == 1.0


class Loud(TwoSites):
    """``low``'s gradient is 100x the size of ``full``'s: the whole-model cosine sees ``low`` alone."""

    def __init__(self, d: int = 64) -> None:
        super().__init__(d)
        self.low, self.full = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 100 * self.low(a).square().mean() + self.full(b).square().mean()


def test_a_tensor_floor_protects_the_sites_a_whole_model_floor_cannot_see():
    torch.manual_seed(0)
    d, n = 64, 512
    model = Loud(d)
    a, b = torch.randn(n, 4) @ torch.randn(4, d) / 2, torch.randn(n, d)  # low's input and output: rank 4
    config = laser.LaserConfig(rank=4, min_numel=0, policy="paper")
    whole = laser.plan(model, lambda m: m(a, b), laser.Target(grad_cosine=0.99), config)
    assert not whole.protected and not whole.raised  # met as it is: low's exact gradient dominates
    assert whole.measured.cosine >= 0.99 and whole.measured.worst_tensor == "full.weight"
    assert whole.measured.tensor_cosine < 0.9  # ... while full's own gradient is far off
    plan = laser.plan(model, lambda m: m(a, b), laser.Target(tensor_cosine=0.99), config)
    # full's input and output are full rank: no rank under D/2 holds them, so both are kept raw; low stays coded
    assert set(plan.protected) == {"full/input:64", "full/mm:64"} and not plan.raised
    assert all(cosine < 0.99 for cosine in plan.protected.values())
    assert plan.measured.tensor_cosine >= 0.99 and plan.measured.stored_fraction < 1.0
    assert plan.config.rank_for("low/input:64") == 4
    assert "protected full/input:64" in str(plan) and "least faithful tensor" in str(plan)
    with pytest.raises(ValueError, match="exactly one of grad_cosine, tensor_cosine"):
        laser.Target(grad_cosine=0.99, tensor_cosine=0.99)
    with pytest.raises(ValueError, match=r"tensor_cosine=1.5 is invalid: must be in \(0, 1\]"):
        laser.Target(tensor_cosine=1.5)


def test_an_error_target_sets_per_site_ranks_and_a_byte_budget_is_met():
    model, loss_fn = problem()
    config = laser.LaserConfig(rank=4, min_numel=0, policy="paper")
    plan = laser.plan(model, loss_fn, laser.Target(max_error=0.01), config)
    assert plan.config.max_error == 0.01 and plan.measured.cosine > 0.999
    budget = laser.plan(model, loss_fn, laser.Target(stored_fraction=0.6), config)
    assert budget.measured.stored_fraction <= 0.6 and budget.config.max_error is not None


def test_targets_are_validated():
    with pytest.raises(ValueError, match="exactly one"):
        laser.Target()
    with pytest.raises(ValueError, match="exactly one"):
        laser.Target(grad_cosine=0.9, max_error=0.1)
    with pytest.raises(ValueError, match="grad_cosine=1.5"):
        laser.Target(grad_cosine=1.5)
