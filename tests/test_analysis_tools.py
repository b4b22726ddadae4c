"""Analysis tools on models whose answers are known by hand: recorder, gradient fidelity, depth, sites, report."""

import argparse
import dataclasses
import fnmatch
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from laser.analysis.analyze import REPORT_NAME, analyze, check_claims, register
from laser.analysis.collect import ActivationRecorder, collect_activations, main_sites, oracle_fidelity
from laser.analysis.depth import depth_scaling, linear_fit, measure_depth
from laser.analysis.gradients import glob_literal, gradient_fidelity, parameter_gradient
from laser.analysis.sites import format_site_table, site_table
from laser.config import LaserConfig, NoneConfig
from laser.report import Report, SiteReport

PROPERTY = settings(max_examples=25, deadline=None)
B, D = 64, 32  # B * D = 2048 elements: above every method's default min_numel (1024)


def low_rank(rows: int, dim: int, rank: int, seed: int = 0, space_seed: int = 100) -> torch.Tensor:
    """``U V^T`` with orthonormal U (rows, rank) and V (dim, rank): ``rank`` equal singular values of 1.

    ``V`` (the row space) depends on ``space_seed`` only, so batches of different ``seed`` share it.
    """
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=torch.Generator().manual_seed(seed)))
    v, _ = torch.linalg.qr(torch.randn(dim, rank, generator=torch.Generator().manual_seed(space_seed)))
    return u @ v.T


def numerical_rank(x: torch.Tensor) -> int:
    """Singular values above 1e-4 of the largest, counted independently of the code under test."""
    sv = torch.linalg.svdvals(x.double())
    return int((sv > 1e-4 * sv[0]).sum())


class Block(nn.Module):
    """Saves three storages per call: the linear's input, tanh's output and sigmoid's output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.lin(h)
        return torch.tanh(h) * torch.sigmoid(h)


class Looped(nn.Module):
    """One weight-tied block run ``warm`` times without grad, then ``steps`` times with it."""

    def __init__(self, steps: int, warm: int = 0) -> None:
        super().__init__()
        self.steps, self.warm = steps, warm
        self.block = Block()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for _ in range(self.warm):
                h = self.block(h)
        for _ in range(self.steps):
            h = self.block(h)
        return h


class LinearLoop(nn.Module):
    """``h = W h`` repeated: every activation lies in the row space of the input."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.lin = nn.Linear(D, D, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            h = self.lin(h)
        return h


class TanhLoop(nn.Module):
    """``h = tanh(W h)`` repeated ``steps`` times: one new (B, D) storage per step plus the input."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.lin = nn.Linear(D, D, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            h = torch.tanh(self.lin(h))
        return h


def square_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().sum()


# -----------------------------------------------------------------------------
# recorder


def test_recorder_recovers_rank_of_low_rank_activations():
    torch.manual_seed(0)
    steps = 4
    model = LinearLoop(steps)
    x = low_rank(B, D, rank=3) * 10
    acts, by_step = collect_activations(model, [x, x.clone()], lambda m, b: m(b), max_rows=10_000, per_step=True)
    # Two streams into the one linear: the model's input (step 0, no history) and the linear's own outputs.
    assert list(acts) == ["lin/input:32", "lin/mm:32"]
    assert acts["lin/input:32"].shape == (2 * B, D)  # two batches, one input of B rows each
    assert acts["lin/mm:32"].shape == (2 * (steps - 1) * B, D)  # two batches, three linear outputs each
    # Step j saves h_j = x (W^T)^j: rank 3 in a subspace of its own, so the pool has rank 3 * steps.
    assert numerical_rank(torch.cat([acts["lin/input:32"], acts["lin/mm:32"]])) == 3 * steps
    assert numerical_rank(acts["lin/mm:32"]) == 3 * (steps - 1)
    assert list(by_step["lin/input:32"]) == [0]
    assert list(by_step["lin/mm:32"]) == list(range(1, steps))
    per_step = {**by_step["lin/input:32"], **by_step["lin/mm:32"]}
    h = x.double()
    weight = model.lin.weight.detach().double()
    for step in range(steps):
        rows = per_step[step]
        assert rows.shape == (2 * B, D)
        assert numerical_rank(rows) == 3
        torch.testing.assert_close(rows.double().sum(0), 2 * h.sum(0), rtol=1e-4, atol=1e-3)
        h = h @ weight.T


def test_recorder_sample_is_bounded_and_seeded():
    torch.manual_seed(0)
    model = LinearLoop(steps=3)
    x = torch.randn(B, D)
    first = collect_activations(model, [x], lambda m, b: m(b), max_rows=50, seed=7)["lin/mm:32"]  # 2B rows seen
    again = collect_activations(model, [x], lambda m, b: m(b), max_rows=50, seed=7)["lin/mm:32"]
    other = collect_activations(model, [x], lambda m, b: m(b), max_rows=50, seed=8)["lin/mm:32"]
    assert first.shape == (50, D)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_per_step_indices_count_recursion_steps_of_weight_tied_block():
    torch.manual_seed(0)
    steps, warm = 5, 2
    model = Looped(steps, warm)
    x = torch.randn(B, D)
    recorder = ActivationRecorder(model, max_rows=10_000, per_step=True)
    with recorder:
        model(x)
    by_step = recorder.step_activations()
    # The linear's input is the no-grad calls' output (no history) at step 0, the previous call's product after
    # (named by the block, which returned it; its steps are the block's calls).
    assert sorted(by_step) == ["block.lin/input:32", "block/mul:32", "block/sigmoid:32", "block/tanh:32"]
    # The no-grad calls save nothing and do not count: grad steps are 0..steps-1.
    assert list(by_step["block.lin/input:32"]) == [0]
    assert list(by_step["block/mul:32"]) == list(range(1, steps))
    assert list(by_step["block/tanh:32"]) == list(range(steps))
    assert list(by_step["block/sigmoid:32"]) == list(range(steps))
    # Per call: one linear input, tanh's output and sigmoid's output, B rows each.
    assert all(rows.shape == (B, D) for steps_ in by_step.values() for rows in steps_.values())
    assert recorder.rows_seen == {"block.lin/input:32": B, "block/mul:32": (steps - 1) * B,
                                  "block/tanh:32": steps * B, "block/sigmoid:32": steps * B}
    # Step 0's linear input is the block's input after the two no-grad calls.
    h = x
    with torch.no_grad():
        for _ in range(warm):
            h = model.block(h)
    torch.testing.assert_close(by_step["block.lin/input:32"][0].sum(0), h.sum(0))
    with recorder:  # a new forward starts counting again at step 0
        model(x)
    again = recorder.step_activations()
    assert list(again["block.lin/input:32"]) == [0]
    assert list(again["block/mul:32"]) == list(range(1, steps))
    assert list(again["block/tanh:32"]) == list(range(steps))
    recorder.remove()


class WithParameters(nn.Module):
    """Saves its input, a linear's output, a 1-D parameter, a transposed weight and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)
        self.scale = nn.Parameter(torch.full((D,), 3.0))
        self.register_buffer("offset", torch.full((D,), 5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale * self.offset


def test_recorder_never_records_parameters_or_buffers():
    torch.manual_seed(0)
    model = WithParameters()
    x = torch.randn(B, D)
    recorder = ActivationRecorder(model, max_rows=10_000, config=NoneConfig(min_numel=0, min_dim=1))
    with recorder:
        model(x).sum().backward()
    recorder.remove()
    acts = recorder.activations()
    rows = torch.cat(list(acts.values()))
    # Activations only: x (saved by the linear) and lin(x) (saved by the product with scale); B rows each.
    assert sum(recorder.rows_seen.values()) == 2 * B
    assert rows.shape == (2 * B, D)
    parameter_rows = torch.cat([model.lin.weight, model.lin.weight.T, model.scale[None], model.offset[None]])
    assert not any(torch.equal(row, p) for row in rows for p in parameter_rows)
    assert sorted(acts) == ["lin/input:32", "lin/mm:32"]  # lin(x) is named by lin, which returned it
    torch.testing.assert_close(acts["lin/input:32"].sum(0), x.sum(0))
    assert model.scale.grad is not None  # training was unchanged


def test_main_sites_picks_widest_site_per_kind():
    sites = ["blocks.0.attn/addmm:192", "blocks.0.attn.qkv/mul:64", "blocks.0.mlp/mm:512", "blocks.0.mlp/mul:256",
             "blocks.0.mlp.down/silu:256", "head/add:64", "blocks.0/add:64", "mlp_like.attnx/mm:999"]
    assert main_sites(sites) == {"mlp": "blocks.0.mlp/mm:512", "attn": "blocks.0.attn/addmm:192"}


def test_oracle_fidelity_is_exact_at_the_true_rank_and_skips_ranks_that_do_not_compress():
    x = low_rank(200, 64, rank=32, seed=3)
    fidelity = oracle_fidelity(x, ranks=(16, 32, 64, 128), bits=(32,))
    assert set(fidelity) == {(16, 32), (32, 32)}
    assert fidelity[(32, 32)] == pytest.approx(1.0, abs=1e-6)
    assert fidelity[(16, 32)] == pytest.approx(math.sqrt(0.5), abs=1e-5)  # half of 32 equal singular values


# -----------------------------------------------------------------------------
# gradient fidelity


class TwoLinear(nn.Module):
    """``y = W2 W1 x``: every saved activation has the rank of ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(D, D, bias=False)
        self.lin2 = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.lin1(x))


def test_glob_literal_matches_only_the_name():
    name = "blocks[0].mlp*:512?"
    assert fnmatch.fnmatchcase(name, glob_literal(name))
    assert not fnmatch.fnmatchcase("blocks0.mlpX:5123", glob_literal(name))


def test_gradient_fidelity_is_one_at_rank_of_activations():
    torch.manual_seed(0)
    model = TwoLinear()
    batches = [low_rank(B, D, rank=3, seed=s) * 10 for s in range(2)]
    exact = parameter_gradient(model, batches, square_loss)
    result = gradient_fidelity(model, batches, square_loss, rank=4, max_rank=4, policy="paper")
    # lin1 saves the model's input, lin2 lin1's output (named by lin1, which returned it); the loss outside
    # the model stays raw
    assert {s.site for s in result.sites} == {"lin1/input:32", "lin1/mm:32"}
    assert result.model_cosine == pytest.approx(1.0, abs=1e-6)
    assert result.model_relative_grad_error < 1e-4
    for row in result.sites:
        assert row.rank == 4
        assert row.relative_error < 1e-4
        assert row.cosine == pytest.approx(1.0, abs=1e-6)
    # The measurement never wrote .grad and left the exact gradient as it was.
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(parameter_gradient(model, batches, square_loss), exact)


def test_gradient_fidelity_drops_below_one_at_a_tiny_rank():
    torch.manual_seed(0)
    model = TwoLinear()
    batches = [low_rank(B, D, rank=3, seed=s) * 10 for s in range(2)]
    result = gradient_fidelity(model, batches, square_loss, rank=1, max_rank=1, policy="paper")
    rows = {s.site: s for s in result.sites}
    # Three equal singular values: any rank-1 projection inside the row space keeps 1/3 of the energy.
    assert rows["lin1/input:32"].relative_error == pytest.approx(math.sqrt(2 / 3), abs=1e-3)
    assert rows["lin1/input:32"].fidelity == pytest.approx(math.sqrt(1 / 3), abs=1e-3)
    assert all(s.cosine < 0.999 for s in result.sites)
    assert result.model_cosine < 0.999
    assert result.model_relative_error > 0.5


# -----------------------------------------------------------------------------
# depth scaling


def test_depth_scaling_bytes_by_hand():
    torch.manual_seed(0)
    weights = TanhLoop(1).state_dict()

    def model_at_depth(n: int) -> nn.Module:
        model = TanhLoop(n)
        model.load_state_dict(weights)
        return model

    k, depths = 4, (2, 4, 8)
    x = torch.randn(B, D)
    result = depth_scaling(model_at_depth, x, square_loss, depths=depths, rank=k, policy="paper", threshold=0.01)
    # LASER's own state per site and step (threshold 0.01: no step is low, so no reset is due and the step
    # samples `growth` rows): the D x k fp32 X^T Z accumulator, the fp32 row sample and its fp64 keys.
    growth = LaserConfig().growth
    state = D * k * 4 + growth * D * 4 + growth * 8
    for point in result.points:
        n = point.depth
        # Kept: the input x and every step's tanh output, B x D fp32 each.
        assert point.baseline_bytes == (n + 1) * B * D * 4
        # LASER: B x k fp32 codes per storage, plus one D x k fp32 basis and the state at each of its two sites
        # (x is saved inside `lin`, every tanh output at the model's top level).
        assert point.laser_basis_bytes == 2 * D * k * 4 + 2 * state  # constant in depth: bases and state
        assert point.laser_bytes == (n + 1) * B * k * 4 + 2 * D * k * 4 + 2 * state
        assert point.ranks == {"lin/input:32": k, "TanhLoop/tanh:32": k}
    _, report = measure_depth(model_at_depth(2), x, square_loss, rank=k, policy="paper", threshold=0.01)
    assert {row.name: (row.tensors, row.stored_bytes - row.state_bytes, row.state_bytes) for row in report.sites} == {
        "lin/input:32": (1, B * k * 4 + D * k * 4, state),
        "TanhLoop/tanh:32": (2, 2 * B * k * 4 + D * k * 4, state),
    }
    assert result.baseline_fit.slope == pytest.approx(B * D * 4)
    assert result.baseline_fit.r2 == pytest.approx(1.0)
    assert result.slope_ratio == pytest.approx(k / D)
    # The O-forms take their constants from depth 2, so they miss only the input's storage.
    assert result.predicted_baseline == pytest.approx([(3 / 2) * n * B * D * 4 for n in depths])


def test_depth_scaling_rejects_a_single_depth():
    with pytest.raises(ValueError, match="depths"):
        depth_scaling(lambda n: TanhLoop(n), torch.randn(B, D), square_loss, depths=(4,))


@PROPERTY
@given(st.lists(st.integers(1, 1000), min_size=2, max_size=6, unique=True), st.floats(-1e6, 1e6),
       st.integers(-10_000, 10_000))
def test_linear_fit_recovers_exact_lines(xs, intercept, slope):
    fit = linear_fit(xs, [intercept + slope * x for x in xs])
    assert fit.slope == pytest.approx(slope, abs=1e-6)
    assert fit.intercept == pytest.approx(intercept, abs=1e-3)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)


# -----------------------------------------------------------------------------
# per-site table


def test_site_table_by_hand():
    report = Report([
        SiteReport("a.mlp:512", 512, 32, 0.99, raw_bytes=1000, stored_bytes=100),
        SiteReport("a.attn:192", 192, 32, 0.98, raw_bytes=500, stored_bytes=250),
        SiteReport("a:64", 64, 64, 1.0, raw_bytes=100, stored_bytes=100, tensors=2, fallbacks=2,
                   reasons={"break-even": 1, "frozen": 1}),
        SiteReport("b:8", 8, 8, 1.0, raw_bytes=50, stored_bytes=50, tensors=1, fallbacks=1, reasons={"too small": 1}),
    ], method="laser")
    rows = site_table(report)
    assert [r.site for r in rows] == ["a.mlp:512", "a.attn:192", "a:64", "b:8"]
    assert [r.share for r in rows] == pytest.approx([900 / 1150, 250 / 1150, 0.0, 0.0])
    assert [r.savings for r in rows] == pytest.approx([0.9, 0.5, 0.0, 0.0])
    # Kept raw past break-even is overhead; kept raw because never admitted (too small) is not.
    assert [r.overhead for r in rows] == [False, False, True, False]
    table = format_site_table(rows)
    assert "0.0% (overhead)" in table and "90.0%" in table and "78.3%" in table


@PROPERTY
@given(st.lists(st.tuples(st.integers(1, 10_000), st.integers(0, 20_000)), min_size=1, max_size=8))
def test_site_shares_sum_to_one(pairs):
    report = Report([SiteReport(f"s{i}:8", 8, 8, 1.0, raw_bytes=r, stored_bytes=s) for i, (r, s) in enumerate(pairs)])
    if report.raw_bytes == report.stored_bytes:
        with pytest.raises(ValueError, match="saved no bytes"):
            site_table(report)
        return
    assert math.fsum(r.share for r in site_table(report)) == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# the report on a tiny trained run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from laser.train import Trainer, apply_overrides, train_preset

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = apply_overrides(train_preset("tiny"), ["method=laser", "method.rank=4"])
    Trainer(dataclasses.replace(cfg, out_dir=str(out))).train()
    return out


def test_analyze_writes_every_section(tiny_run, tmp_path):
    path = analyze(tiny_run, out_dir=tmp_path / "analysis", max_batches=2, quick=True)
    assert path == tmp_path / "analysis" / REPORT_NAME
    text = path.read_text()
    for heading in ("## Claims of the paper on this run", "## Spectra", "## Oracle PCA fidelity",
                    "## Linearity", "## Activation statistics and INT8", "## Gradient fidelity",
                    "## Memory against recursion depth", "## Per-site compression"):
        assert heading in text
    assert "only the final checkpoint" in text  # the trainer keeps one checkpoint: said in plain words
    for figure in ("spectra.png", "depth.png", "gradient-sites.png", "histogram-mlp.png", "oracle-fidelity-mlp.png",
                   "laser-fidelity.png"):
        assert f"({figure})" in text
        assert (path.parent / figure).stat().st_size > 0
    results = json.loads((path.parent / "analysis.json").read_text())
    from laser.data import maze
    from laser.train import train_preset

    d = train_preset("tiny").data
    split = maze.load_split(d.size, d.count, d.val_count, d.seed, d.min_path, d.cache_dir)
    trivial = float((split.val_inputs == split.val_targets).all(axis=1).mean())  # copying the input solves these
    assert results["run"]["trivial_solve_rate"] == pytest.approx(trivial)
    assert f"solves {100 * trivial:.1f}% of these mazes (the trivial rate)" in text
    verdicts = [c["held"] for c in results["claims"]]
    assert len(verdicts) == 7 and all(v in (True, False, None) for v in verdicts)
    # gate_up output (2 x 256), named by gate_up, which returned it
    assert results["spectra"]["main_sites"]["mlp"] == "blocks.0.mlp.gate_up/mm:512"
    point = results["depth"]["points"][0]
    assert point["baseline_bytes"] > point["laser_bytes"] > 0


def test_claims_follow_the_measured_numbers():
    results = {
        "spectra": {"main_sites": {"mlp": "m:512"},
                    "sites": {"m:512": {"dim": 512, "effective_ranks": {"0.99": 200}}},
                    "oracle_fidelity": {"m:512": {"10": {"128/8": 0.97, "128/16": 0.98, "128/32": 0.99}}}},
        "linearity": {"m:512": [{"gain": 0.001, "rank": 8}, {"gain": -0.002, "rank": 30}]},
        "stats": {"m:512": {"int8": {"relative_mse_max": 1e-4, "relative_mse_sigma": 5e-4},
                            "pca_int8": [{"mean_shift": 0.001, "std_change": 0.01}]}},
        "gradients": {"model_cosine": 0.995, "model_relative_error": 0.05, "sites": []},
        "depth": {"baseline_fit": {"slope": 100.0, "r2": 1.0}, "laser_fit": {"slope": 20.0, "r2": 0.999},
                  "slope_ratio": 0.2},
    }
    held = [c.held for c in check_claims(results)]
    # rank 200 > 512/4; fidelity 0.97 < 0.975; gain small; INT8 5e-4 too large; stats fine; gradients; depth.
    assert held == [False, False, True, False, True, True, True]


def test_analyze_without_checkpoint_names_the_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        analyze(tmp_path)


def test_register_adds_the_analyze_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="laser")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", str(tmp_path), "--out", "somewhere", "--batches", "3"])
    assert (args.run_dir, args.out, args.batches) == (str(tmp_path), "somewhere", 3)
    with pytest.raises(SystemExit) as exit_info:
        args.run(args)
    assert exit_info.value.code == 2
    assert "checkpoint.pt" in capsys.readouterr().err
