"""Honest comparison reports (issue 13, part 4): the baseline is a candidate on every "who wins" line, each
accuracy difference states its test, p-value and the smallest difference its seeds could detect, a difference
under that is reported as one the seeds cannot tell, and the plots mark the baseline."""

import importlib
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from laser.analysis.plots import gradient_cosine_figure, pareto_figure, plot_gradient_cosine, plot_pareto
from laser.analysis.stats import WELCH_TEST, min_detectable_difference, seed_difference, welch_df

compare_mod = importlib.import_module("laser.train.compare")
summarize = compare_mod.summarize
PROPERTY = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------------------------- the statistics
def test_min_detectable_difference_by_hand():
    # s^2 = 1 in both arms, n = 3: se = sqrt(2/3), Welch df = (2/3)^2 / (2 (1/3)^2 / 2) = 4;
    # t(0.975, 4) = 2.776445, t(0.8, 4) = 0.940965 (tables): MDD = 3.717410 * 0.816497 = 3.035260.
    a, b = [1.0, 2.0, 3.0], [11.0, 12.0, 13.0]
    assert welch_df(a, b) == pytest.approx(4.0)
    assert min_detectable_difference(a, b) == pytest.approx(3.035260, abs=1e-5)
    # Unequal spreads and sizes: s^2/n = 0.5/2 = 0.25 and 4/3, df = (19/12)^2 / (0.25^2 / 1 + (4/3)^2 / 2).
    a, b = [0.0, 1.0], [0.0, 2.0, 4.0]
    df = (19 / 12) ** 2 / (0.0625 + (16 / 9) / 2)
    assert welch_df(a, b) == pytest.approx(df) == pytest.approx(2.63504, abs=1e-5)
    expected = (scipy_stats.t.ppf(0.975, df) + scipy_stats.t.ppf(0.8, df)) * math.sqrt(19 / 12)
    assert min_detectable_difference(a, b) == pytest.approx(expected)
    # Larger alpha or smaller power: a smaller detectable difference.
    assert min_detectable_difference(a, b, alpha=0.2) < expected
    assert min_detectable_difference(a, b, power=0.5) < expected


def test_min_detectable_difference_undefined_cases():
    assert min_detectable_difference([0.5], [0.4, 0.6]) is None  # one seed: no spread to estimate
    assert min_detectable_difference([0.5, 0.5], [0.4, 0.4]) is None  # no spread at all
    assert min_detectable_difference([1.0, 1.0], [0.4, 0.6]) is not None  # one arm without spread: defined
    with pytest.raises(ValueError, match="alpha"):
        min_detectable_difference([0.0, 1.0], [0.0, 1.0], alpha=0.0)
    one = seed_difference([0.9], [0.5])
    assert (one.p_value, one.min_detectable, one.told_apart) == (None, None, False) and "1 seed" in one.note
    assert not one.significant
    flat = seed_difference([0.5, 0.5], [0.4, 0.4])
    assert flat.told_apart and flat.p_value is None and "no spread" in flat.note and not flat.significant
    assert not seed_difference([0.5, 0.5], [0.5, 0.5]).told_apart


samples = st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=6)


@PROPERTY
@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy's reference on near-equal samples
@given(samples, samples, st.floats(0.1, 10), st.floats(-5, 5))
def test_seed_difference_properties(a, b, scale, shift):
    mdd = min_detectable_difference(a, b)
    if mdd is None or mdd < 1e-6:
        return
    # Symmetric, invariant to a common shift, equivariant to a common scale.
    assert min_detectable_difference(b, a) == pytest.approx(mdd)
    assert min_detectable_difference([v + shift for v in a], [v + shift for v in b]) == pytest.approx(mdd, rel=1e-6)
    assert min_detectable_difference([v * scale for v in a], [v * scale for v in b]) == pytest.approx(scale * mdd)
    d = seed_difference(a, b)
    assert d.test == WELCH_TEST and d.min_detectable == pytest.approx(mdd)
    assert d.p_value == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue, abs=1e-9)
    if d.told_apart:  # a difference at least the MDD is significant at alpha
        assert d.p_value < d.alpha and d.significant
    assert d.told_apart == (abs(d.difference) >= mdd)
    assert d.significant == (d.p_value < d.alpha)


# ---------------------------------------------------------------------------------- the report lines
def entry(memory: list[float], time: list[float], solve: list[float], cosine: list[float],
          base_memory: float = 1e6) -> dict:
    return {"activation_bytes": summarize(memory), "activation_ratio": summarize([m / base_memory for m in memory]),
            "step_time_ratio": summarize(time), "solve_rate": summarize(solve), "token_acc": summarize(solve),
            "gradient_cosine": {"model": summarize(cosine), "curve": []}}


def with_p_values(results: dict, baseline: str) -> dict:
    for label, e in results.items():
        e["p_value"] = None if label == baseline else compare_mod.welch_p_value(
            e["solve_rate"]["per_seed"], results[baseline]["solve_rate"]["per_seed"])
    return results


def test_baseline_that_is_faster_exact_and_solves_more_is_named():
    # The new user's case: the baseline was faster, exact, and solved more; four seeds tell them apart.
    results = with_p_values({
        "none": entry([1e6] * 4, [1.0] * 4, [0.60, 0.62, 0.61, 0.63], [1.0] * 4),
        "laser": entry([1e5] * 4, [1.39, 1.41, 1.41, 1.43], [0.30, 0.32, 0.31, 0.33], [0.97, 0.971, 0.972, 0.973]),
        "laser:quantize=int8": entry([5e4] * 4, [1.50, 1.52, 1.51, 1.53], [0.20, 0.22, 0.21, 0.23],
                                     [0.95, 0.951, 0.952, 0.953]),
    }, "none")
    lines = compare_mod.axis_winners(results, "none")
    by_axis = {line.split(":")[0]: line for line in lines}
    assert by_axis["- fastest"].startswith("- fastest: the baseline **none** (step time 1.00 ± 0.00")
    assert "among the other methods **laser** (step time 1.41" in by_axis["- fastest"]
    assert by_axis["- most faithful gradients"].startswith("- most faithful gradients: the baseline **none** "
                                                           "(cosine 1.0000); among the other methods **laser**")
    assert by_axis["- highest solve rate"].startswith("- highest solve rate: the baseline **none** (61.5")
    # Each line states its evidence: difference, the smallest the seeds could detect, the test's p.
    assert "at least the" in by_axis["- highest solve rate"] and "Welch t-test p = " in by_axis["- highest solve rate"]
    assert by_axis["- least activation memory"].startswith("- least activation memory: **laser:quantize=int8**")
    assert "**none** (baseline)" in by_axis["- Pareto front (activation memory, step time, solve rate; means, the "
                                            "baseline included)"]
    # No other method keeps the baseline's solve rate: the baseline itself is the answer.
    assert any("not significantly below the baseline's: the baseline **none** itself" in line for line in lines)
    table = "\n".join(compare_mod.accuracy_tests(results, "none"))
    assert "| laser | solve rate | -30.00 points | Welch t-test |" in table
    assert "told apart: lower than the baseline" in table and WELCH_TEST in table


def test_difference_under_the_detectable_one_names_no_winner():
    # "laser" has the higher mean solve rate, but by less than its noisy seeds could detect.
    results = with_p_values({
        "none": entry([1e6] * 3, [1.0] * 3, [0.50, 0.55, 0.60], [1.0] * 3),
        "laser": entry([1e5] * 3, [0.98, 1.05, 0.96], [0.30, 0.60, 0.90], [0.99, 0.98, 0.97]),
    }, "none")
    d = seed_difference(results["laser"]["solve_rate"]["per_seed"], results["none"]["solve_rate"]["per_seed"])
    assert 0 < d.difference < d.min_detectable
    lines = "\n".join(compare_mod.axis_winners(results, "none"))
    assert ("- highest solve rate: the seeds cannot tell **laser** (60.0 ± 30.0%), the best mean, from the "
            "baseline **none** (55.0 ± 5.0%)") in lines
    assert f"under the {100 * d.min_detectable:.1f} points the seeds could detect" in lines
    assert "neither is named the winner" in lines
    assert "- fastest: the seeds cannot tell **laser**" in lines  # 0.997x on average, within the spread
    table = "\n".join(compare_mod.accuracy_tests(results, "none"))
    assert (f"| laser | solve rate | +5.00 points | Welch t-test | {d.p_value:.3g} | "
            f"{100 * d.min_detectable:.1f} points | the seeds cannot tell them apart |") in table


def test_a_significant_difference_under_the_detectable_one_is_not_called_noise():
    # compare-quick600's sketch: p = 0.04 at alpha 0.05, but 47 points under the 53 its seeds could detect
    results = with_p_values({"none": entry([1e6] * 3, [1.0] * 3, [0.971, 0.971, 1.0], [1.0] * 3),
                             "sketch": entry([4e5] * 3, [1.26] * 3, [0.707, 0.408, 0.406], [0.3] * 3)}, "none")
    d = seed_difference(results["sketch"]["solve_rate"]["per_seed"], results["none"]["solve_rate"]["per_seed"])
    assert d.p_value < d.alpha and abs(d.difference) < d.min_detectable and not d.told_apart
    table = "\n".join(compare_mod.accuracy_tests(results, "none"))
    assert (f"| sketch | solve rate | {100 * d.difference:+.2f} points | Welch t-test | {d.p_value:.3g} | "
            f"{100 * d.min_detectable:.1f} points | lower at p < 0.05, but under the smallest detectable difference: "
            "too few seeds to size it |") in table
    lines = "\n".join(compare_mod.axis_winners(results, "none"))
    assert "< 0.05, but a difference this small is detected less than 80% of the time" in lines


def test_one_seed_says_it_cannot_tell():
    results = with_p_values({"none": entry([1e6], [1.0], [0.5], [1.0]),
                             "laser": entry([1e5], [0.9], [0.7], [0.99])}, "none")
    lines = "\n".join(compare_mod.axis_winners(results, "none"))
    assert "- highest solve rate: the seeds cannot tell **laser** (70.0 ± 0.0%)" in lines
    assert "1 seed: no test" in lines
    table = "\n".join(compare_mod.accuracy_tests(results, "none"))
    assert ("| laser | solve rate | +20.00 points | Welch t-test | - | - | "
            "the seeds cannot tell them apart (1 seed") in table


# ------------------------------------------------------------------------------------------- the plots
POINTS = {"none": {"memory": 10.0, "solve": 60.0, "solve_std": 1.0, "time": 1.0, "time_std": 0.0},
          "laser": {"memory": 1.0, "solve": 30.0, "solve_std": 2.0, "time": 1.4, "time_std": 0.1}}
CURVES = {"none": [(10, 1.0, 0.0), (20, 1.0, 0.0)], "laser": [(20, 0.97, 0.01), (10, 0.99, 0.005)]}


def _legend(ax) -> dict:
    handles, labels = ax.get_legend_handles_labels()
    return dict(zip(labels, handles, strict=True))


def _marker(handle) -> str:
    return (handle[0] if isinstance(handle, tuple) else handle).get_marker()


def test_pareto_plot_marks_the_baseline(tmp_path):
    fig = pareto_figure(POINTS, "none", trivial=5.0)
    for ax in fig.axes:
        legend = _legend(ax)
        assert {"none (baseline)", "laser"} <= set(legend)
        assert _marker(legend["none (baseline)"].lines) == "*" and _marker(legend["laser"].lines) == "o"
        assert "none (baseline)" in [t.get_text() for t in ax.texts]
    assert "trivial (copy input)" in _legend(fig.axes[0])
    assert plot_pareto(POINTS, tmp_path / "p.png", "none").read_bytes()[:4] == b"\x89PNG"


def test_gradient_cosine_plot_per_method_with_the_baseline_marked(tmp_path):
    fig = gradient_cosine_figure(CURVES, "none")
    cos_ax, gap_ax = fig.axes
    legend = _legend(cos_ax)
    assert set(legend) == {"none (baseline)", "laser"}
    line = legend["laser"].lines[0]
    assert list(line.get_xdata()) == [10, 20] and list(line.get_ydata()) == [0.99, 0.97]  # sorted by step
    assert _marker(legend["none (baseline)"].lines) == "*"
    assert set(_legend(gap_ax)) == {"laser"}  # the exact baseline has no 1 - cosine to draw on a log axis
    empty = gradient_cosine_figure({"none": [], "laser": []}, "none")
    assert "no gradient probes" in empty.axes[0].texts[0].get_text()
    assert plot_gradient_cosine(CURVES, tmp_path / "g.png", "none").read_bytes()[:4] == b"\x89PNG"


def test_write_plots_writes_grad_cosine_and_the_report_links_it(tmp_path):
    """The full report path on a synthetic two-method results dict (no training)."""
    def full(label: str, solve: list[float], cosine: list[float], memory: float) -> dict:
        e = entry([memory] * 2, [1.0, 1.0] if label == "none" else [1.3, 1.32], solve, cosine)
        curves = {"eval": [{"step": 5, "solve_rate": solve[0], "token_acc": 0.9}],
                  "train": [{"step": 5, "loss": 1.0, "token_acc": 0.9, "stored_bytes": memory, "ranks": {}}]}
        e.update(method=label, name=label, options={}, baseline=label == "none", seeds=[100, 101],
                 peak_memory_bytes=summarize([2e8, 2e8]), peak_step_memory_bytes=summarize([1.5e8, 1.5e8]),
                 trivial_solve_rate=0.01,
                 p_value_token_acc=None, compression_share=summarize([0.0, 0.0]), steps=10, device="cpu",
                 precision="fp32", report={"sites": [{"name": "h:8", "dim": 8, "rank": 8, "fidelity": 1.0,
                                                      "raw_bytes": 100, "stored_bytes": 100, "savings": 0.0}]},
                 curves={"100": curves, "101": curves})
        e["gradient_cosine"]["sites"] = {}
        e["gradient_cosine"]["curve"] = [{"step": 5, "model": summarize(cosine)},
                                         {"step": 10, "model": summarize(cosine)}]
        return e

    results = with_p_values({"none": full("none", [0.5, 0.52], [1.0, 1.0], 1e6),
                             "laser": full("laser", [0.49, 0.53], [0.98, 0.99], 1e5)}, "none")
    plots = compare_mod.write_plots(results, tmp_path)
    assert "grad_cosine.png" in plots and (tmp_path / "grad_cosine.png").read_bytes()[:4] == b"\x89PNG"
    resolved = {"preset": "synthetic", "jobs": 1, "threads": 1, "base": {}, "methods": list(results)}
    report = compare_mod.render_report(results, resolved, compare_mod.markdown_table(results, "none"), plots,
                                       1.0, "none")
    assert "![grad_cosine.png](grad_cosine.png)" in report and "[grad_cosine.png](grad_cosine.png)):" in report
    assert "## Accuracy against the baseline" in report
    assert "| laser | solve rate | +0.00 points | Welch t-test | 1 |" in report
    # Equal means: a tie, no winner.
    assert ("- highest solve rate: a tie: the baseline **none** (51.0 ± 1.4%) and **laser** (51.0 ± 2.8%) have "
            "equal means") in report
    json.dumps(results)  # still JSON
