"""Basis math: orthonormality, power iteration, expansion, reset, fidelity, break-even, sampling."""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laser import subspace

SETTINGS = settings(max_examples=25, deadline=None)


def random_orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    return q


def known_spectrum(n: int, d: int, singular: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X = U diag(s) V^T with random orthonormal U, V; returns (X, V)."""
    r = len(singular)
    u = random_orthonormal(n, r, seed)
    v = random_orthonormal(d, r, seed + 1)
    return u @ torch.diag(torch.tensor(singular)) @ v.T, v


def max_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle from span(b) to span(a), via its sine ||(I - A A^T) B||_2 (accurate near 0)."""
    a, b = a.double(), b.double()
    sine = torch.linalg.matrix_norm(b - a @ (a.T @ b), ord=2)
    return float(torch.arcsin(sine.clamp(max=1.0)))


def is_orthonormal(q: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=tol)


@SETTINGS
@given(d=st.integers(4, 48), k=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_orthonormalize_orders_columns_by_energy(d, k, seed):
    k = min(k, d)
    m = torch.randn(d, k, generator=torch.Generator().manual_seed(seed))
    q = subspace.orthonormalize(m)
    assert is_orthonormal(q)
    assert max_principal_angle(q, torch.linalg.qr(m)[0]) < 1e-3  # same span
    energy = (q.T @ m).square().sum(dim=1)
    assert torch.all(energy[:-1] >= energy[1:] - 1e-4 * energy.max())


@SETTINGS
@given(shapes=st.lists(st.sampled_from([(16, 4), (16, 4), (24, 6), (8, 8)]), min_size=1, max_size=6),
       seed=st.integers(0, 10_000))
def test_power_steps_batch_equals_one_at_a_time(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    accumulators = [torch.randn(*shape, generator=g) for shape in shapes]
    for batched, m in zip(subspace.power_steps(accumulators), accumulators, strict=True):
        assert torch.allclose(batched, subspace.power_step(m), atol=1e-5)


@SETTINGS
@given(d=st.integers(6, 40), k=st.integers(1, 5), m=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_expand_keeps_basis_orthonormal_and_old_columns(d, k, m, seed):
    k = min(k, d - 1)
    basis = random_orthonormal(d, k, seed)
    rows = torch.randn(m, d, generator=torch.Generator().manual_seed(seed + 7))
    grown = subspace.expand(basis, rows, max_rank=d)
    assert is_orthonormal(grown, tol=1e-4)
    assert torch.equal(grown[:, :k], basis)
    assert grown.shape[1] == min(k + m, d)
    residual = rows.T - grown @ (grown.T @ rows.T)  # sampled rows now lie in the span
    assert residual.norm() < 1e-3 * rows.norm()


def test_expand_respects_max_rank_and_ignores_rows_in_span():
    basis = random_orthonormal(16, 4, 0)
    inside = (basis @ torch.randn(4, 3)).T  # rows already in the span
    assert torch.equal(subspace.expand(basis, inside, max_rank=16), basis)
    capped = subspace.expand(basis, torch.randn(5, 16), max_rank=6)
    assert capped.shape == (16, 6)


def test_top_k_basis_equals_svd_on_known_spectrum():
    x, v = known_spectrum(200, 32, [10.0, 8.0, 5.0, 3.0, 1.0, 0.5], seed=3)
    basis = subspace.top_k_basis(x, 4)
    assert is_orthonormal(basis)
    assert max_principal_angle(basis, v[:, :4]) < 1e-4


def test_randomized_top_k_matches_exact(monkeypatch):
    x, v = known_spectrum(300, 40, [9.0, 7.0, 4.0, 2.0, 0.1, 0.05], seed=5)
    monkeypatch.setattr(subspace, "EXACT_SVD_FLOPS", 0)  # force the randomized path
    basis = subspace.top_k_basis(x, 3, torch.Generator().manual_seed(0))
    assert max_principal_angle(basis, v[:, :3]) < 1e-3


def test_top_k_basis_completes_rank_deficient_input():
    x, v = known_spectrum(50, 20, [3.0, 2.0], seed=1)
    basis = subspace.top_k_basis(x, 6, torch.Generator().manual_seed(0))
    assert basis.shape == (20, 6) and is_orthonormal(basis)
    assert max_principal_angle(basis[:, :2], v) < 1e-4


def test_power_iteration_converges_to_top_subspace_on_stationary_stream():
    """Matrix-free power steps over the same stream: principal angles to its top-k space go to 0."""
    d, k = 48, 4
    _, v = known_spectrum(10, d, [1.0] * 8, seed=11)  # 8 orthonormal directions
    scales = torch.tensor([10.0, 8.0, 6.0, 5.0, 1.0, 0.8, 0.5, 0.3])
    gen = torch.Generator().manual_seed(2)
    stream = [(torch.randn(64, 8, generator=gen) * scales) @ v.T for _ in range(4)]  # 4 recursion steps
    target = torch.linalg.svd(torch.cat(stream), full_matrices=False)[2][:k].T
    basis = random_orthonormal(d, k, 99)
    angles = [max_principal_angle(basis, target)]
    for _ in range(30):
        accumulator = torch.zeros(d, k)
        for x in stream:
            accumulator += x.T @ (x @ basis)
        basis = subspace.power_step(accumulator)
        angles.append(max_principal_angle(basis, target))
    assert angles[0] > 0.5
    assert angles[-1] < 1e-3
    assert all(b <= a + 1e-4 for a, b in zip(angles, angles[1:], strict=False))


@SETTINGS
@given(n=st.integers(2, 40), d=st.integers(2, 24), k=st.integers(1, 24), seed=st.integers(0, 10_000))
def test_fidelity_equals_cosine_between_x_and_reconstruction(n, d, k, seed):
    k = min(k, d)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    z = x @ q
    cosine = torch.nn.functional.cosine_similarity(x.flatten(), (z @ q.T).flatten(), dim=0)
    f = subspace.fidelity(z.square().sum(), x.square().sum())
    assert math.isclose(float(f), float(cosine), rel_tol=1e-7, abs_tol=1e-9)


def test_breaks_even_against_hand_computed_sizes():
    # 1000 rows of width 512 in fp32 = 2,048,000 bytes; rank 128 bf16 codes + fp32 basis = 518,144 bytes
    assert subspace.breaks_even(1000, 512, 128, activation_bytes=4, code_bytes=2)
    # rank 256 fp16 codes of fp16 activations of width 256: codes alone equal the raw size
    assert not subspace.breaks_even(1000, 256, 256, activation_bytes=2, code_bytes=2)
    # few rows: the basis dominates
    assert not subspace.breaks_even(4, 512, 128, activation_bytes=4, code_bytes=4)
    # 6 bf16 rows of width 64 at rank 4: raw 768 bytes; codes 48 + an fp32 basis 1024 lose, + a bf16 basis 512 win
    assert not subspace.breaks_even(6, 64, 4, activation_bytes=2, code_bytes=2)
    assert subspace.breaks_even(6, 64, 4, activation_bytes=2, code_bytes=2, basis_bytes=2)


def test_sample_rows_is_uniform_without_replacement_and_reproducible():
    x = torch.arange(100.0).repeat(3, 1).T  # row i = (i, i, i)
    picks = torch.zeros(100)
    for seed in range(300):
        gen = torch.Generator().manual_seed(seed)
        rows, keys = subspace.sample_rows(x[:50], 10, gen)
        rows, keys = subspace.sample_rows(x[50:], 10, gen, rows, keys)
        assert rows.shape == (10, 3) and rows[:, 0].unique().numel() == 10
        picks[rows[:, 0].long()] += 1
    # each row is picked with probability 10/100: 30 expected of 300, binomial sd ~5.2
    assert picks.min() > 8 and picks.max() < 55
    a = subspace.sample_rows(x, 5, torch.Generator().manual_seed(1))[0]
    b = subspace.sample_rows(x, 5, torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b)


@SETTINGS
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8), count=st.integers(1, 30),
       seed=st.integers(0, 10_000), small=st.sampled_from([subspace.SMALL_SAMPLE, 0]))
def test_streamed_sample_holds_distinct_stream_rows_and_top_rows_has_the_largest_keys(sizes, count, seed, small):
    x = torch.arange(float(sum(sizes))).repeat(2, 1).T  # row i = (i, i)
    gen = torch.Generator().manual_seed(seed)
    rows = keys = None
    start = 0
    with mock.patch.object(subspace, "SMALL_SAMPLE", small):  # the Python merge, or the tensor path
        for n in sizes:
            rows, keys = subspace.sample_rows(x[start : start + n], count, gen, rows, keys)
            start += n
    assert rows.shape == (min(count, sum(sizes)), 2) and keys.shape == (len(rows),)
    assert rows[:, 0].unique().numel() == len(rows) and torch.equal(rows[:, 0], rows[:, 1])
    assert ((keys > 0) & (keys < 1)).all()
    best = subspace.top_rows(rows, keys, 3)
    assert torch.equal(best, rows[torch.argsort(keys, descending=True)[:3]])


@pytest.mark.parametrize("small", [64, 0])
def test_streamed_sample_is_uniform_over_uneven_matrices(monkeypatch, small):
    """Each of 100 rows, streamed as matrices of 7, 30, 3, 40 and 20 rows, is kept with probability 12/100."""
    monkeypatch.setattr(subspace, "SMALL_SAMPLE", small)  # the Python merge, or the tensor path
    sizes = [7, 30, 3, 40, 20]
    x = torch.arange(100.0)[:, None]
    picks = torch.zeros(100)
    seeds = 600
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        rows = keys = None
        for chunk in x.split(sizes):
            rows, keys = subspace.sample_rows(chunk, 12, gen, rows, keys)
        picks[rows[:, 0].long()] += 1
    expected = seeds * 12 / 100  # 72, binomial sd 8.0
    per_matrix = torch.stack([p.mean() for p in picks.split(sizes)])
    assert picks.min() > expected - 4.5 * 8.0 and picks.max() < expected + 4.5 * 8.0
    assert (per_matrix - expected).abs().max() < 10  # no matrix is favoured (its mean has sd <= 8 / sqrt(3))
    assert abs(float(picks.sum()) - seeds * 12) < 1e-9


def test_complete_basis_rejects_impossible_rank():
    with pytest.raises(ValueError, match="orthonormal"):
        subspace.complete_basis(random_orthonormal(4, 2, 0), 5)
