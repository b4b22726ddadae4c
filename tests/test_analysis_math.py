"""Analysis math on synthetic data whose answer is known in closed form."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laser.analysis import spectra
from laser.analysis.gradients import tensor_gradients
from laser.analysis.linearity import linearity_check
from laser.analysis.plots import (
    plot_fidelity_over_training,
    plot_histograms,
    plot_scatter,
    plot_spectra,
    plot_xy,
)
from laser.analysis.spectra import (
    cumulative_energy,
    effective_rank,
    int8_round_trip,
    pca_fidelity,
    principal_angles,
    quantize_codes,
    singular_values,
    summarize,
)
from laser.analysis.stats import activation_stats, histogram, int8_error, pca_int8_stats

PROPERTY = settings(max_examples=25, deadline=None)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random (rows, cols) fp64 matrix with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def with_spectrum(n: int, s: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """X = U diag(s) V^T with random orthonormal U (n, d) and orthogonal V (d, d); returns (X, V)."""
    d = s.numel()
    u = orthonormal(n, d, seed)
    v = orthonormal(d, d, seed + 1)
    return u @ torch.diag(s.to(torch.float64)) @ v.T, v


def fidelity_by_hand(x: torch.Tensor, basis: torch.Tensor, int8: bool) -> float:
    """Explicit reconstruction X_hat = Z' Q^T and flattened cosine, no shortcuts."""
    codes = x @ basis
    if int8:
        scales = codes.abs().amax(dim=0) / 127
        codes = torch.clamp(torch.round(codes / scales), -127, 127) * scales
    x_hat = codes @ basis.T
    return torch.nn.functional.cosine_similarity(x.flatten(), x_hat.flatten(), dim=0).item()


# -----------------------------------------------------------------------------
# spectra


@pytest.mark.parametrize("route", ["gram", "svd"])
def test_singular_values_match_prescribed_spectrum(route, monkeypatch):
    if route == "svd":
        monkeypatch.setattr(spectra, "GRAM_MAX_DIM", 8)
    s = 2.0 ** -(torch.arange(40, dtype=torch.float64) / 4)  # spans 1 .. 1e-3
    x, _ = with_spectrum(300, s)
    sv = singular_values(x.to(torch.float32) if route == "svd" else x)
    tolerance = 1e-5 if route == "svd" else 1e-9
    torch.testing.assert_close(sv, s, rtol=tolerance, atol=tolerance)


def test_singular_values_of_wide_matrix():
    s = torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    x, _ = with_spectrum(50, s)
    torch.testing.assert_close(singular_values(x.T.contiguous()), s)  # (4, 50): N < D


def test_cumulative_energy_and_effective_rank_by_hand():
    sv = torch.tensor([1.0, 4.0, 2.0, 3.0])  # unsorted on purpose; energies 16, 9, 4, 1 of 30
    torch.testing.assert_close(cumulative_energy(sv), torch.tensor([16, 25, 29, 30], dtype=torch.float64) / 30)
    assert effective_rank(sv, 0.5) == 1
    assert effective_rank(sv, 0.8) == 2
    assert effective_rank(sv, 0.95) == 3
    assert effective_rank(sv, 0.97) == 4
    assert effective_rank(sv, 1.0) == 4


@PROPERTY
@given(seed=st.integers(0, 10_000), d=st.integers(2, 24), energy=st.floats(0.05, 1.0))
def test_effective_rank_matches_brute_force(seed, d, energy):
    s = torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).sort(descending=True)
    s = s.values + 1e-3
    x, _ = with_spectrum(3 * d, s, seed)
    total = float((s**2).sum())
    expected = next(k for k in range(1, d + 1) if float((s[:k] ** 2).sum()) / total >= energy - 1e-9)
    assert effective_rank(singular_values(x), energy) == expected


def test_pca_fidelity_exact_rank_r():
    r = 6
    s = torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0, 1.0] + [0.0] * 26, dtype=torch.float64)
    x, v = with_spectrum(400, s)
    assert pca_fidelity(x, r) == pytest.approx(1.0, abs=1e-5)
    assert pca_fidelity(x.to(torch.float32), r) == pytest.approx(1.0, abs=1e-5)
    expected = math.sqrt(float((s[: r - 1] ** 2).sum() / (s**2).sum()))
    assert pca_fidelity(x, r - 1) == pytest.approx(expected, rel=1e-9)
    assert expected < 1
    # The top right singular vectors are V's first columns, so passing them as a basis agrees.
    assert pca_fidelity(x, r - 1, basis=v) == pytest.approx(expected, rel=1e-9)


def test_quantized_codes_lower_fidelity_only_slightly():
    s = torch.linspace(10, 0.1, 48, dtype=torch.float64)
    x, _ = with_spectrum(600, s)
    for rank in (4, 16, 48):
        exact = pca_fidelity(x, rank)
        basis = spectra.principal_basis(x, rank)
        for bits in (16, 8):
            quantized = pca_fidelity(x, rank, bits=bits)
            # Cauchy-Schwarz: <Z, Z'> / ||Z'|| <= ||Z||, so quantizing never raises the cosine.
            assert quantized <= exact + 1e-12
            assert quantized > exact - 1e-3
        assert pca_fidelity(x, rank, bits=32) == exact
        assert pca_fidelity(x, rank, bits=8) == pytest.approx(fidelity_by_hand(x, basis, int8=True), abs=1e-9)


def test_pca_fidelity_with_given_basis_matches_explicit_reconstruction():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 20, generator=g, dtype=torch.float64)
    basis = orthonormal(20, 7, seed=5)
    assert pca_fidelity(x, 7, basis=basis) == pytest.approx(fidelity_by_hand(x, basis, int8=False), abs=1e-12)
    assert pca_fidelity(x, 3, basis=basis) == pytest.approx(fidelity_by_hand(x, basis[:, :3], False), abs=1e-12)
    assert pca_fidelity(x, 7, basis=basis, bits=8) == pytest.approx(fidelity_by_hand(x, basis, True), abs=1e-9)
    with pytest.raises(ValueError, match="orthonormal"):
        pca_fidelity(x, 7, basis=2 * basis)


@PROPERTY
@given(seed=st.integers(0, 10_000), n=st.integers(2, 30), d=st.integers(2, 12))
def test_pca_fidelity_squared_is_captured_energy(seed, n, d):
    # Eckart-Young: the best rank-k projection keeps exactly the top-k share of sum s^2.
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = torch.linalg.svdvals(x)
    previous = 0.0
    for rank in range(1, min(n, d) + 1):
        fidelity = pca_fidelity(x, rank)
        assert fidelity**2 == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()), abs=1e-9)
        assert fidelity >= previous - 1e-12
        previous = fidelity


def test_quantize_codes_precisions():
    g = torch.Generator().manual_seed(0)
    # Columns with scales 100, 1, 0.01 and an all-zero column.
    codes = torch.randn(500, 4, generator=g, dtype=torch.float64) * torch.tensor([100.0, 1.0, 0.01, 0.0])
    assert quantize_codes(codes, None) is codes
    bf16 = quantize_codes(codes, 16)
    assert ((bf16 - codes).abs() <= codes.abs() * 2.0**-8).all()
    int8 = quantize_codes(codes, 8)
    step = codes.abs().amax(dim=0) / 127
    assert ((int8 - codes).abs() <= step / 2 + 1e-15).all()  # every column on its own grid
    assert (int8[:, 3] == 0).all()
    assert len(torch.unique(torch.round(int8[:, 1] / step[1]))) <= 255
    with pytest.raises(ValueError, match="bits"):
        quantize_codes(codes, 4)


def test_int8_round_trip_clips_and_rounds():
    x = torch.tensor([0.0, 0.26, -0.74, 1.0, 300.0, -300.0], dtype=torch.float64)
    torch.testing.assert_close(int8_round_trip(x, 0.5), torch.tensor([0.0, 0.5, -0.5, 1.0, 63.5, -63.5]).double())


def test_summarize_fields():
    s = torch.linspace(5, 0.05, 100, dtype=torch.float64)
    x, _ = with_spectrum(300, s)
    summary = summarize(x.to(torch.float32))
    assert (summary.dim, summary.n_rows) == (100, 300)
    torch.testing.assert_close(summary.singular_values, s, rtol=1e-4, atol=1e-4)
    total = float((s**2).sum())
    for energy in (0.95, 0.99):
        expected = next(k for k in range(1, 101) if float((s[:k] ** 2).sum()) / total >= energy)
        assert summary.effective_ranks[energy] == expected
    assert set(summary.energy_at_rank) == {32, 64}  # 128 and 256 exceed D = 100
    assert summary.energy_at_rank[32] == pytest.approx(float((s[:32] ** 2).sum()) / total, rel=1e-4)


def test_principal_angles_identical_and_orthogonal():
    frame = orthonormal(30, 6, seed=11)
    torch.testing.assert_close(principal_angles(frame[:, :3], frame[:, :3]), torch.zeros(3, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(principal_angles(frame[:, :3], frame[:, 3:]), torch.full((3,), math.pi / 2).double())
    # The same span in another orthonormal basis has zero angles too.
    rotation = orthonormal(3, 3, seed=12)
    torch.testing.assert_close(principal_angles(frame[:, :3], frame[:, :3] @ rotation),
                               torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)


@PROPERTY
@given(a=st.floats(0.05, math.pi / 2), b=st.floats(0.05, math.pi / 2), seed=st.integers(0, 1000))
def test_principal_angles_of_known_rotations(a, b, seed):
    e = orthonormal(20, 5, seed)
    q1 = torch.stack([e[:, 0], e[:, 2]], dim=1)
    q2 = torch.stack([math.cos(a) * e[:, 0] + math.sin(a) * e[:, 1], math.cos(b) * e[:, 2] + math.sin(b) * e[:, 3],
                      e[:, 4]], dim=1)  # one extra direction orthogonal to q1: still min(2, 3) = 2 angles
    angles = principal_angles(q1, q2.to(torch.float32))
    torch.testing.assert_close(angles, torch.tensor(sorted([a, b]), dtype=torch.float64), atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: singular_values(torch.randn(10)), "2-D"),
        (lambda: singular_values(torch.ones(4, 3, dtype=torch.int64)), "floating"),
        (lambda: pca_fidelity(torch.randn(10, 4), 0), "rank"),
        (lambda: pca_fidelity(torch.randn(10, 4), 5), "rank"),
        (lambda: pca_fidelity(torch.zeros(10, 4), 2), "zeros"),
        (lambda: pca_fidelity(torch.randn(10, 4), 2, bits=4), "bits"),
        (lambda: effective_rank(torch.ones(3), 1.5), "energy"),
        (lambda: principal_angles(torch.eye(4)[:, :2], torch.eye(5)[:, :2]), "same D"),
    ],
)
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -----------------------------------------------------------------------------
# stats


def test_gaussian_outlier_rates_match_prediction():
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(400, 500, generator=g)  # 200k values, mean 3, std 2
    stats = activation_stats(x)
    n = x.numel()
    assert stats.mean == pytest.approx(3.0, abs=5 * 2 / math.sqrt(n))
    assert stats.std == pytest.approx(2.0, rel=5 / math.sqrt(2 * n))
    assert stats.gaussian_rates[2.0] == pytest.approx(0.0455003, rel=1e-5)  # table values of 2 (1 - Phi(k))
    assert stats.gaussian_rates[3.0] == pytest.approx(0.0026998, rel=1e-4)
    for k in (2.0, 3.0):
        p = stats.gaussian_rates[k]
        # Binomial sampling error, plus slack for standardising by the sample mean and std.
        assert abs(stats.outlier_rates[k] - p) < 6 * math.sqrt(p * (1 - p) / n)
    assert abs(stats.excess_kurtosis) < 5 * math.sqrt(24 / n)
    assert 0.85 < stats.channel_std_min / 2 < stats.channel_std_median / 2 < stats.channel_std_max / 2 < 1.15


def test_heavy_tails_exceed_gaussian_rates():
    rng = np.random.default_rng(1)
    laplace = activation_stats(torch.from_numpy(rng.laplace(size=(400, 500))))
    for k in (2.0, 3.0):
        # Laplace with std sigma: P(|x| > k sigma) = exp(-k sqrt 2).
        assert laplace.outlier_rates[k] > laplace.gaussian_rates[k]
        assert laplace.outlier_rates[k] == pytest.approx(math.exp(-k * math.sqrt(2)), rel=0.05)
    assert laplace.excess_kurtosis == pytest.approx(3.0, abs=0.5)
    student = activation_stats(torch.from_numpy(rng.standard_t(3, size=(400, 500))))
    for k in (3.0, 4.0, 5.0):
        assert student.outlier_rates[k] > 3 * student.gaussian_rates[k]
    assert student.excess_kurtosis > 3


def test_channel_std_range():
    g = torch.Generator().manual_seed(2)
    scales = torch.linspace(0.5, 2.0, 64)
    stats = activation_stats(torch.randn(4000, 64, generator=g) * scales)
    assert stats.channel_std_min == pytest.approx(0.5, rel=0.06)
    assert stats.channel_std_max == pytest.approx(2.0, rel=0.06)
    assert stats.channel_std_median == pytest.approx(1.25, rel=0.06)


def test_int8_error_of_gaussian_follows_uniform_rounding_noise():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1000, 1000, generator=g)
    result = int8_error(x)
    energy = float(x.double().square().mean())
    absmax = float(x.abs().max())
    assert result["scale_max"] == pytest.approx(absmax / 127, rel=1e-6)
    # Rounding error is ~uniform on [-scale/2, scale/2]: variance scale^2 / 12.
    assert result["relative_mse_max"] / ((absmax / 127) ** 2 / 12 / energy) == pytest.approx(1.0, abs=0.05)
    sigma_noise = (4 / 127) ** 2 / 12 / energy
    assert 1.0 < result["relative_mse_sigma"] / sigma_noise < 1.3  # finer grid, plus a little clipping
    assert result["relative_mse_sigma"] < result["relative_mse_max"] < 3e-4  # the paper's regime
    p = math.erfc(4 / math.sqrt(2))
    assert abs(result["clip_rate_sigma"] - p) < 6 * math.sqrt(p / x.numel())


def test_pca_int8_stats_preserve_moments_of_low_rank_gaussian():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 64, generator=g,
                                                                              dtype=torch.float64)
    rows = pca_int8_stats(x.to(torch.float32), ranks=(8, 16, 32, 128))
    assert [row["rank"] for row in rows] == [8, 16, 32]  # 128 > D = 64 is skipped
    s = torch.linalg.svdvals(x)
    for row in rows:
        assert row["mean"] == pytest.approx(x.mean().item(), abs=1e-6)
        assert row["std"] == pytest.approx(x.std(unbiased=False).item(), rel=1e-6)
    low, exact, above = rows
    kept = float((s[:8] ** 2).sum() / (s**2).sum())
    assert low["relative_mse_projection"] == pytest.approx(1 - kept, rel=1e-4)
    for row in (exact, above):
        k = row["rank"]
        codes = x @ torch.linalg.svd(x, full_matrices=False).Vh[:k].T  # (N, k)
        # Per-column rounding noise ~ uniform: N * step_j^2 / 12 per column, over the energy of x.
        noise = float((x.shape[0] * (codes.abs().amax(dim=0) / 127) ** 2 / 12).sum() / x.square().sum())
        assert row["relative_mse_projection"] < 1e-10
        assert row["relative_mse"] / noise == pytest.approx(1.0, abs=0.2)
        assert row["mean_shift"] < 0.02
        assert row["std_change"] < 0.02
        assert row["std_hat"] == pytest.approx(row["std"], rel=0.02)


def test_histogram_matches_numpy():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 100, generator=g, dtype=torch.float64)
    counts, edges = histogram(x, bins=50, range_sigma=3.0)
    mean, std = x.mean().item(), x.std(unbiased=False).item()
    assert counts.shape == (50,) and edges.shape == (51,)
    assert edges[0] == pytest.approx(mean - 3 * std) and edges[-1] == pytest.approx(mean + 3 * std)
    expected, _ = np.histogram(x.numpy().ravel(), bins=edges)
    np.testing.assert_array_equal(counts, expected)


# -----------------------------------------------------------------------------
# linearity


def test_linear_subspace_gives_no_autoencoder_gain():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(400, 4, generator=g) @ torch.randn(4, 16, generator=g)
    state = torch.get_rng_state()
    result = linearity_check(x, rank=4, steps=100, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert (result.train_rows, result.test_rows) == (320, 80)
    assert result.pca_cosine > 1 - 1e-9
    assert result.gain <= 0.005
    assert result.gain == pytest.approx(result.autoencoder_cosine - result.pca_cosine)
    assert linearity_check(x, rank=4, steps=100, seed=1) == result  # deterministic by seed


def test_affine_subspace_is_linear_for_pca():
    # An offset rank-3 subspace: PCA is fitted after centering, so it reconstructs it exactly.
    g = torch.Generator().manual_seed(10)
    x = torch.randn(500, 3, generator=g) @ torch.randn(3, 12, generator=g) + 5 * torch.randn(12, generator=g)
    result = linearity_check(x, rank=3, steps=50)
    assert result.pca_cosine > 1 - 1e-9


def test_curved_manifold_favours_autoencoder():
    g = torch.Generator().manual_seed(8)
    t = torch.rand(800, generator=g) * 3 * math.pi
    helix = torch.stack([t.cos(), t.sin(), 0.3 * t], dim=1)  # (800, 3), a curve: intrinsic dimension 1
    result = linearity_check(helix, rank=1, steps=250)
    assert result.pca_cosine < 0.95
    assert result.gain > 0.03


# -----------------------------------------------------------------------------
# plots


def is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_every_plot_writes_a_png(tmp_path):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(200, 48, generator=g)
    summaries = {"mlp": summarize(x), "attn": summarize(x[:, :16])}
    outputs = [
        plot_spectra(summaries, tmp_path / "nested" / "spectra.png"),
        plot_fidelity_over_training(
            {"k=128, 8-bit": [(0, 0.99), (10, 0.97), (20, 0.98)], "k=64": [(20, 0.95), (0, 0.96)]},
            tmp_path / "fidelity.png",
            "oracle fidelity",
            threshold=0.95,
        ),
        plot_histograms({"raw": histogram(x), "pca+int8": histogram(x * 1.01)}, tmp_path / "hist.png"),
        plot_xy({"laser": ([1, 2, 4], [1.0, 2.0, 4.0])}, tmp_path / "xy.png", "depth", "bytes", "scaling",
                logx=True, logy=True),
        plot_scatter({"laser": (0.5, 0.9), "none": (1.0, 0.92)}, tmp_path / "pareto.png", "memory", "acc", "pareto"),
    ]
    for path in outputs:
        assert is_png(path)
    with pytest.raises(ValueError, match="empty"):
        plot_xy({}, tmp_path / "empty.png", "x", "y", "t")


@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_tensor_gradients_split_a_flat_gradient_into_its_tensors(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    exact = torch.randn(sum(sizes), generator=g, dtype=torch.float64)
    approx = exact + 0.5 * torch.randn(sum(sizes), generator=g, dtype=torch.float64)
    named = [(f"p{i}", n) for i, n in enumerate(sizes)]
    rows = tensor_gradients(approx, exact, named)
    assert [r.cosine for r in rows] == sorted(r.cosine for r in rows)
    starts = dict(zip([n for n, _ in named], [sum(sizes[:i]) for i in range(len(sizes))], strict=True))
    for row in rows:
        size = dict(named)[row.name]
        a, e = approx[starts[row.name]:][:size], exact[starts[row.name]:][:size]
        assert row.cosine == pytest.approx(torch.nn.functional.cosine_similarity(a, e, dim=0).item(), abs=1e-12)
        assert row.sign_agreement == pytest.approx((torch.sign(a) == torch.sign(e)).double().mean().item())
    assert all(r.cosine == pytest.approx(1.0) and r.sign_agreement == 1.0
               for r in tensor_gradients(exact, exact, named))


def test_tensor_gradients_reject_sizes_that_do_not_add_up():
    with pytest.raises(ValueError, match="cannot be split into tensors of 3 entries"):
        tensor_gradients(torch.zeros(4), torch.zeros(4), [("w", 3)])
