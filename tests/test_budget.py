"""Budget mode on models whose answer is known: which site must be protected, which rank each site needs."""

from __future__ import annotations

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
    # full's input and its output (saved by the square) are full rank; low's are rank 4 and stay coded
    assert set(plan.protected) == {"full/input:64", "full/addmm:64"}
    assert all(cosine < 0.99 for cosine in plan.protected.values())
    assert plan.measured.cosine >= 0.99 and plan.measured.stored_fraction < 1.0  # low/ still coded
    assert "protected full/input:64" in str(plan)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was


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
