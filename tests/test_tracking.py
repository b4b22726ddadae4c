"""Tracking math: oversampled subspace iteration (``LaserConfig.oversample``) against Algorithm 1's single
power step, on streams whose top-k subspace is known."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import laser
from laser import subspace

SITE = "Linear/input:64"


def drifting_covariance(d: int, k: int, gap: float, angle: float, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A covariance whose top-k eigenvectors rotate by ``angle`` a step (planes (i, k + i)) with the next k
    eigenvalues only ``gap`` below (a small gap: one power step converges slowly); and its top-k basis."""
    frame = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    c, s = math.cos(step * angle), math.sin(step * angle)
    for i in range(k):
        a, b = frame[:, i].clone(), frame[:, k + i].clone()
        frame[:, i], frame[:, k + i] = c * a - s * b, s * a + c * b
    values = torch.cat([torch.ones(k), torch.full((k,), gap), torch.full((d - 2 * k,), 0.01)]).double()
    return frame @ torch.diag(values) @ frame.T, frame[:, :k]


def subspace_error(basis: torch.Tensor, truth: torch.Tensor) -> float:
    """sin of the largest principal angle between span(basis) and span(truth)."""
    cosines = torch.linalg.svdvals(basis.double().T @ truth.double())
    return float((1 - cosines.min().clamp(max=1.0) ** 2).clamp_min(0).sqrt())


@pytest.mark.parametrize("angle", [0.0, 0.05])
def test_oversampled_subspace_iteration_converges_at_least_as_fast_as_one_power_step(angle):
    """The tracking update on exact statistics ``M = C Q`` (what ``M = sum X^T X Q`` estimates): the leading k
    columns of an oversampled basis approach the top-k subspace at least as fast as a k-column basis."""
    d, k, p = 64, 8, 8
    start = torch.linalg.qr(torch.randn(d, k + p, generator=torch.Generator().manual_seed(1))).Q
    errors = {}
    for extra in (0, p):
        basis, trace = start[:, : k + extra], []
        for step in range(30):
            covariance, truth = drifting_covariance(d, k, 0.9, angle, step)
            basis = subspace.power_step((covariance @ basis.double()).float())
            trace.append(subspace_error(basis[:, :k], truth))
        errors[extra] = trace
    assert all(o <= q + 1e-4 for o, q in zip(errors[p], errors[0], strict=True)), errors
    assert errors[p][-1] < 0.5 * errors[0][-1], errors  # (0.9 / 1)^t against (0.01 / 1)^t


def test_oversample_stores_only_the_coded_rank():
    d, k, p, n = 64, 8, 8, 512
    lin = nn.Linear(d, d)
    comp = laser.Compressor(lin, laser.LaserConfig(rank=k, oversample=p, min_numel=0, policy="paper"))
    x = torch.randn(n, 4) @ torch.randn(4, d)  # within the rank: fidelity 1, no expansion
    for _ in range(2):
        with comp:
            lin(x).sum().backward()
        row = comp.report().site(SITE)
        comp.step()
    assert comp.sites[SITE].basis.shape == (d, k + p) and comp.sites[SITE].rank == k
    # codes n x k; the whole tracked basis d x (k + p) once; state: accumulator d x (k + p), growth rows + keys
    assert row.rank == k
    assert row.stored_bytes - row.state_bytes == n * k * 4 + d * (k + p) * 4


@settings(max_examples=15, deadline=None)
@given(d=st.integers(16, 48), k=st.integers(1, 8), p=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_tracked_basis_stays_orthonormal(d, k, p, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(d, d)
    comp = laser.Compressor(lin, laser.LaserConfig(rank=k, oversample=p, min_numel=0, policy="paper"))
    for _ in range(3):
        with comp:
            lin(torch.randn(4 * d, d)).sum().backward()
        comp.step()
    for state in comp.sites.values():
        if state.basis is not None:
            q = state.basis
            assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-5)
            assert state.rank <= q.shape[1] <= min(state.rank + p, d) or state.rank == q.shape[1]


@pytest.mark.parametrize("oversample", [0, 8])
def test_exact_on_activations_within_the_coded_rank(oversample):
    d, r, n = 64, 4, 512
    torch.manual_seed(0)
    lin = nn.Linear(d, d)
    twin = copy.deepcopy(lin)
    x = torch.randn(n, r) @ torch.randn(r, d)
    comp = laser.Compressor(lin, laser.LaserConfig(rank=r, oversample=oversample, min_numel=0, policy="paper"))
    for _ in range(3):
        lin.zero_grad()
        with comp:
            lin(x).square().sum().backward()
        comp.step()
    twin(x).square().sum().backward()
    assert (lin.weight.grad - twin.weight.grad).norm() <= 1e-4 * twin.weight.grad.norm()


@settings(max_examples=25, deadline=None)
@given(spectrum=st.lists(st.floats(0.0, 10.0), min_size=2, max_size=12), error=st.floats(0.01, 0.9))
def test_rank_for_error_is_the_smallest_rank_meeting_the_error(spectrum, error):
    d = len(spectrum)
    frame = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    x = torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ frame.T  # singular values = spectrum
    k = subspace.rank_for_error(x, error)
    energy = sorted((v * v for v in spectrum), reverse=True)
    total = sum(energy)

    def err(j):
        return math.sqrt(max(0.0, sum(energy[j:]) / total)) if total else 0.0

    assert 1 <= k <= d
    assert err(k) <= error + 1e-9
    assert k == 1 or err(k - 1) > error - 1e-9


def test_max_error_gives_each_site_the_rank_its_spectrum_needs():
    torch.manual_seed(0)
    d, n = 64, 1024
    model = nn.ModuleDict({"a": nn.Linear(d, d), "b": nn.Linear(d, d)})
    x_a = torch.randn(n, 3) @ torch.randn(3, d)  # exactly rank 3
    x_b = torch.randn(n, 12) @ torch.randn(12, d)  # exactly rank 12
    comp = laser.Compressor(model, laser.LaserConfig(rank=32, max_error=0.01, min_numel=0, policy="paper"))
    for _ in range(2):
        with comp:
            (model["a"](x_a).sum() + model["b"](x_b).sum()).backward()
        comp.step()
    assert comp.sites["a/input:64"].rank == 3 and comp.sites["b/input:64"].rank == 12
    with comp:
        (model["a"](x_a).sum() + model["b"](x_b).sum()).backward()
    report = comp.report()
    assert report.site("a/input:64").fidelity > 0.9999 and report.site("b/input:64").fidelity > 0.9999
    with pytest.raises(ValueError, match="max_error=1.5"):
        laser.LaserConfig(max_error=1.5)
