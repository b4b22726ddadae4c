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


# ----------------------------------------------------------------------------------------------- memory
@settings(max_examples=25, deadline=None)
@given(d=st.integers(4, 40), k=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_memory_moves_with_the_basis_and_loses_nothing_inside_its_span(d, k, seed):
    k = min(k, d)
    g = torch.Generator().manual_seed(seed)
    old = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q
    rotation = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64)).Q
    combined = old @ torch.randn(k, k, generator=g, dtype=torch.float64)  # a statistic inside span(old)
    new = old @ rotation  # the same span, other coordinates (a power step's reordering)
    memory = subspace.memory_in(new, combined, old)
    # against the new basis, the carried statistic is C Q_new = combined @ (Q_old^T Q_new)
    assert torch.allclose(new @ memory, combined @ rotation, atol=1e-10)
    accumulator = torch.randn(d, k, generator=g, dtype=torch.float64)
    assert torch.allclose(subspace.with_memory(accumulator, new, memory, 0.5),
                          accumulator + 0.5 * combined @ rotation, atol=1e-10)
    assert subspace.with_memory(accumulator, new, None, 0.5) is accumulator
    assert subspace.with_memory(accumulator, new, memory, 0.0) is accumulator
    grown = torch.cat([new, torch.zeros(d, 1, dtype=torch.float64)], dim=1)  # a rank the memory is not of
    assert subspace.with_memory(torch.randn(d, k + 1, dtype=torch.float64), grown, memory, 0.5).shape == (d, k + 1)


def alternating_fidelities(memory: float, steps: int = 12) -> tuple[list[float], laser.Compressor]:
    """A linear layer fed two distributions in turn (each rank 2, in directions of their own), as a deep-
    supervision step that restarts from a fixed state alternates with the others; the stored fidelity of
    every step at rank 4, the two spans' sum."""
    d, n = 64, 256
    g = torch.Generator().manual_seed(0)
    frame = torch.linalg.qr(torch.randn(d, 4, generator=g)).Q
    phases = [frame[:, :2], frame[:, 2:]]
    lin = nn.Linear(d, d, bias=False)
    comp = laser.Compressor(lin, laser.LaserConfig(rank=4, memory=memory, min_numel=0, policy="paper"))
    fidelities = []
    for step in range(steps):
        x = torch.randn(n, 2, generator=g) @ phases[step % 2].T
        with comp:
            lin(x).sum().backward()
        fidelities.append(comp.report().site(SITE).fidelity)
        comp.step()
    return fidelities, comp


def test_memory_keeps_the_directions_of_alternating_steps():
    without, _ = alternating_fidelities(0.0)
    remembered, comp = alternating_fidelities(0.75)
    # Algorithm 1 fits each power step to the last step alone: the other phase's directions are lost
    assert min(without[2:]) < 0.5
    # with memory the basis holds both phases once each has been seen (step 2 expands by the second phase)
    assert min(remembered[2:]) > 0.999
    state = comp.sites[SITE]
    assert state.resets == 0 and state.memory.shape == (state.basis.shape[1], state.basis.shape[1])
    assert comp.report().site(SITE).state_bytes >= state.memory.numel() * 4


def test_memory_resumes_exactly_from_a_state_dict():
    _, comp = alternating_fidelities(0.75, steps=5)
    again = laser.Compressor(nn.Linear(64, 64, bias=False), laser.LaserConfig(rank=4, memory=0.75, min_numel=0,
                                                                                policy="paper"))
    again.load_state_dict(comp.state_dict())
    assert torch.equal(again.sites[SITE].memory, comp.sites[SITE].memory)


def test_memory_outside_its_range_is_rejected_with_the_setting_named():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"memory=.* is invalid: must be in \[0, 1\)"):
            laser.LaserConfig(memory=bad)


def position_steps(bases: str, steps: int = 4, positions: int = 2,
                   **options: object) -> tuple[laser.Compressor, nn.Linear, list[torch.Tensor]]:
    """A linear layer called ``positions`` times per forward (recursion steps), each call's input in a rank-2 span
    of its own and freed once saved (so the allocator may hand its address to the next step's input); LASER at
    rank 2 with no room to grow. Returns the compressor after ``steps`` steps, the layer, and the last step's
    weight gradient under LASER and without it."""
    d, n = 64, 256
    g = torch.Generator().manual_seed(0)
    frame = torch.linalg.qr(torch.randn(d, 2 * positions, generator=g)).Q
    lin = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d, d, generator=g) / d**0.5)
    config = {"rank": 2, "max_rank": 2, "min_numel": 0, "policy": "paper", "bases": bases, **options}
    comp = laser.Compressor(lin, laser.LaserConfig(**config))

    def loss_of(draws: list[torch.Tensor]) -> torch.Tensor:
        total = 0
        for p, draw in enumerate(draws):
            x = draw @ frame[:, 2 * p : 2 * p + 2].T  # (n, d), dropped after this step: only its codes stay
            total = total + lin(x).square().sum()
        return total

    for _ in range(steps):
        draws = [torch.randn(n, 2, generator=g) for _ in range(positions)]
        exact = torch.autograd.grad(loss_of(draws), lin.weight)[0]
        with comp:
            loss = loss_of(draws)
        coded = torch.autograd.grad(loss, lin.weight)[0]
        comp.step()
    return comp, lin, [coded, exact]


@pytest.mark.parametrize("positions", [2, 3])
def test_a_basis_per_position_holds_recursion_steps_in_spans_of_their_own(positions):
    shared, _, (coded_shared, exact) = position_steps("site", positions=positions)
    comp, _, (coded, exact_too) = position_steps("position", positions=positions)
    assert torch.equal(exact, exact_too)
    # one rank-2 basis cannot hold two rank-2 spans; one per position holds each exactly
    assert shared.report().site(SITE).fidelity < 0.8
    assert comp.report().site(SITE).fidelity > 0.9999
    torch.testing.assert_close(coded, exact, rtol=1e-4, atol=1e-3)
    assert (coded_shared - exact).norm() > 0.1 * exact.norm()
    # the report keeps one row per site: every position's tensors, the rank each codes with, their bases' bytes
    row = comp.report().site(SITE)
    assert (row.tensors, row.rank) == (positions, 2)
    assert sorted(comp.sites) == [f"{SITE}@{p}" for p in range(positions)]
    bases = sum(state.basis.numel() * 4 for state in comp.sites.values())
    assert row.stored_bytes >= positions * 256 * 2 * 4 + bases


def test_site_ranks_and_max_rank_apply_to_every_position_of_a_site():
    comp, _, (coded, exact) = position_steps("position", positions=3, rank=1, max_rank=None,
                                             site_ranks=(f"{SITE}=2",))
    assert [state.rank for state in comp.sites.values()] == [2, 2, 2]
    torch.testing.assert_close(coded, exact, rtol=1e-4, atol=1e-3)


def test_positions_count_per_forward_and_resume_exactly():
    comp, lin, _ = position_steps("position", steps=3)
    again = laser.Compressor(nn.Linear(64, 64, bias=False),
                             laser.LaserConfig(rank=2, max_rank=2, min_numel=0, policy="paper", bases="position"))
    again.load_state_dict(comp.state_dict())
    for name, state in comp.sites.items():
        assert torch.equal(again.sites[name].basis, state.basis)
    x = torch.randn(8, 64)
    for _ in range(2):  # two forwards in one step (gradient accumulation) reuse positions 0 and 1
        with comp:
            lin(x).sum().backward()
            lin(x).sum().backward()
    assert sorted(comp.sites) == [f"{SITE}@0", f"{SITE}@1"]


def test_bases_other_than_site_or_position_are_rejected_with_the_setting_named():
    with pytest.raises(ValueError, match=r"bases='step' is invalid: use 'site' or 'position'"):
        laser.LaserConfig(bases="step")


def test_a_position_too_small_to_pay_for_its_basis_stays_raw():
    """Position 0 (3 rows) cannot pay for a basis of its own, and no later storage of the forward joins its
    position: it is stored raw (break-even) at once, never held pending and encoded again under another key."""
    lin = nn.Linear(64, 64, bias=False)
    comp = laser.Compressor(lin, laser.LaserConfig(rank=2, max_rank=2, min_numel=0, policy="paper", bases="position"))
    for _ in range(2):
        with comp:
            loss = lin(torch.randn(3, 64)).sum() + lin(torch.randn(256, 64)).sum()
        loss.backward()
        report = comp.report()
        comp.step()
    assert sorted(comp.sites) == [f"{SITE}@0", f"{SITE}@1"]
    row = report.site(SITE)
    assert row.reasons == {"break-even": 1} and row.tensors == 2
    assert row.stored_bytes < row.raw_bytes
