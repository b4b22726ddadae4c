"""Benchmark scripts: hand-checked floors and FLOP counts, the helpers, and a smoke run of every script.

The smoke runs use a tiny TRM (D=64, 2 recursion steps, 5x5 mazes) and check the tables' columns and rows,
never timings.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import CheckpointPolicy

from laser.models.trm import TRMConfig

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.append(str(BENCH))  # appended: benchmarks/profile.py must not shadow the standard library's profile
common = importlib.import_module("common")

TINY = ["--dims", "64", "--depths", "2", "--ranks", "16", "--batch", "1", "--maze", "5", "--warmup", "2",
        "--steps", "2", "--threads", "1"]


def load(name: str) -> object:
    """A benchmark script as a module (by path: ``profile`` is also a standard-library name)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


floor = load("floor")
step = load("step")
profile = load("profile")
host = load("host")
incompressible = load("incompressible")
attention = load("attention")


def table_rows(text: str, header: str) -> list[list[str]]:
    """Cells of the markdown table under ``header`` (the header line itself, then the rows)."""
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


# ----------------------------------------------------------------------------- floors by hand


def test_floor_bytes_by_hand():
    # Two storages of 10 rows x 8 fp32 at rank 2: codes 20*2*4 = 160, basis 8*2*4 = 64.
    assert floor.floor_bytes([10, 10], 8, 2, 4, int8=False) == 224
    # int8: codes 20*2*1 = 40, scales 2 tensors * 2 columns * 4 = 16, basis 64.
    assert floor.floor_bytes([10, 10], 8, 2, 4, int8=True) == 120
    # rank 7 of 8: 20*7*4 + 8*7*4 = 784 > raw 20*8*4 = 640, so raw; rank = width is raw too.
    assert floor.floor_bytes([10, 10], 8, 7, 4, int8=False) == 640
    assert floor.floor_bytes([10, 10], 8, 8, 4, int8=False) == 640
    # int8 at full rank still pays: 20*8*1 + 2*8*4 + 8*8*4 = 480 < 640.
    assert floor.floor_bytes([10, 10], 8, 8, 4, int8=True) == 480
    # bf16 codes: 20*2*2 + 64 = 144; against the bf16 copy of the basis 80 + 8*2*2 = 112.
    assert floor.floor_bytes([10, 10], 8, 2, 2, int8=False) == 144
    assert floor.floor_bytes([10, 10], 8, 2, 2, int8=False, basis_bytes=2) == 112


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(1, 300), min_size=1, max_size=5), dim=st.integers(2, 256),
       ranks=st.tuples(st.integers(1, 256), st.integers(1, 256)), int8=st.booleans())
def test_floor_bytes_grows_with_rank_and_never_exceeds_raw(rows, dim, ranks, int8):
    low, high = sorted(ranks)
    raw = sum(rows) * dim * 4
    assert floor.floor_bytes(rows, dim, low, 4, int8) <= floor.floor_bytes(rows, dim, high, 4, int8) <= raw


def test_compression_flops_by_hand():
    # 8 rows of width 4 at rank 2: three matmuls of 8*4*2 multiply-adds, 2 FLOPs each.
    assert floor.compression_flops([3, 5], 4, 2) == 3 * 2 * 8 * 4 * 2 == 384
    # stride 2: projection and reconstruction see 8 rows, the accumulation ceil(3/2) + ceil(5/2) = 5
    assert floor.compression_flops([3, 5], 4, 2, stride=2) == 2 * (2 * 8 + 5) * 4 * 2 == 336
    # the 5-row storage feeds a linear 4 -> 6: no reconstruction (2*5*4*2 = 80), its weight gradient
    # (dY^T Z) Q^T costs 2 * (5*6*2 + 6*2*4) = 216 instead of dY^T X's 2 * 5*6*4 = 240
    assert floor.compression_flops([3, 5], 4, 2, outputs=[0, 6]) == 384 - 80 + 216 - 240 == 280
    # three storages feeding that linear: dY^T Z each (2*5*6*2 = 120), two products with Q^T (2 * 96)
    assert floor.compression_flops([5, 5, 5], 4, 2, outputs=[6, 6, 6]) == 3 * (160 + 120 - 240) + 2 * 96 == 312


def test_block_flops_by_hand():
    cfg = TRMConfig(hidden=64, heads=1, L_cycles=1, seq_len=25)  # SwiGLU width 256, vocab 5
    tokens = 25
    linear = 2 * tokens * (64 * 192 + 64 * 64 + 64 * 512 + 256 * 64)  # qkv, o, gate_up, down: 3,276,800
    attention = 2 * (2 * tokens * 25 * 64)  # QK^T and PV: 160,000
    per_call = 3 * linear + 3.5 * attention
    head = 3 * 2 * tokens * 64 * 5
    assert floor.block_flops(cfg, batch=1, seq=25) == 2 * per_call + head == 20_828_800
    # checkpointing reruns each of the 2 block calls' forward in backward
    ckpt = TRMConfig(hidden=64, heads=1, L_cycles=1, seq_len=25, checkpoint=True)
    assert floor.block_flops(ckpt, batch=1, seq=25) == 20_828_800 + 2 * (linear + attention) == 27_702_400


@pytest.mark.parametrize(("amp", "variant"), [("none", "laser-paper"), ("bf16", "laser-paper")])
def test_floor_matches_the_reports_bytes_without_fallbacks(amp, variant):
    # Policy "paper" at rank 16 stores every admitted storage as codes: the report's stored bytes without
    # LASER's own state must equal the floor, with the basis in the dtype the records hold (the bf16 copy
    # under bf16 autocast); the state is the rest of the report's stored bytes. Batch 5 (125 rows a tensor):
    # a site's step must pay for its basis, the fp32 accumulator and (bf16) the fp32 master basis, and the
    # output head saves one tensor a step: 125 x 64 x 2 > 125 x 16 x 2 + 64 x 16 x (2 + 4 + 4) in bf16.
    workload = common.Workload(64, 2, 5, maze=5, amp=amp)
    spec = common.method_specs([variant], [16])[1]
    run = common.TrainingRun(workload, spec)
    for _ in range(3):
        run.step()
    report = run.report()
    shapes = floor.record_shapes(workload)  # the storages the plumbing admits, by site
    assert shapes and set(shapes) <= {s.name for s in report.sites}
    for s in report.sites:  # no fallback among admitted storages; the others are all raw, for their reasons
        assert s.fallbacks == (0 if s.name in shapes else s.tensors), s.name
    rows = floor.floor_rows(report, shapes, int8=False, matmul=spec.options.get("matmul_dtype", "auto"))
    assert sum(r["raw"] for r in rows) == report.raw_bytes
    state = sum(s.state_bytes for s in report.sites)
    assert state > 0 and sum(r["state"] for r in rows) == state
    assert sum(r["floor"] for r in rows) == sum(r["stored"] for r in rows) == report.stored_bytes - state
    assert report.stored_bytes - state < report.raw_bytes


# ----------------------------------------------------------------------------- helpers


def test_markdown_table_aligns_and_rejects_ragged_rows():
    text = common.markdown_table(["a", "b"], [[1, "x"], ["y", 2.5]])
    assert text.splitlines() == ["| a | b |", "| :--- | ---: |", "| 1 | x |", "| y | 2.5 |"]
    with pytest.raises(ValueError, match="2 cells"):
        common.markdown_table(["a", "b"], [[1]])


def test_interleaved_medians_alternates_order_and_respects_budget():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    medians, rounds = common.interleaved_medians(steps, rounds=4)
    assert rounds == 4 and calls == ["a", "b", "b", "a", "a", "b", "b", "a"] and set(medians) == {"a", "b"}
    calls.clear()
    _, rounds = common.interleaved_medians(steps, rounds=10, budget_s=0.0)
    assert rounds == 3 and len(calls) == 6  # at least three rounds, then the budget stops it
    with pytest.raises(ValueError, match="--steps"):
        common.interleaved_medians(steps, rounds=0)


def test_method_specs_put_none_first_and_expand_ranks():
    specs = common.method_specs(["laser-paper-int8", "checkpoint", "none"], [64, 128])
    assert [s.label for s in specs] == ["none", "laser-paper-int8 r64", "laser-paper-int8 r128", "checkpoint"]
    assert specs[2].options == {"policy": "paper", "quantize": "int8", "rank": 128, "max_rank": 512}
    assert specs[3].checkpoint and specs[3].name == "none"
    with pytest.raises(ValueError, match="unknown"):
        common.method_specs(["lasr"], [64])



def test_pytorch_peer_specs_wrap_the_block():
    specs = common.method_specs(["sac", "laser+sac", "compile-budget", "laser+compile-budget", "checkpoint"],
                                [16], memory_budget=0.25)
    by_label = {s.label: s for s in specs}
    assert [s.label for s in specs] == ["none", "sac", "laser+sac r16", "compile-budget", "laser+compile-budget r16",
                                        "checkpoint"]
    assert by_label["sac"].recompute == "sac" and by_label["sac"].name == "none" and not by_label["sac"].checkpoint
    assert by_label["laser+sac r16"].name == "laser" and by_label["laser+sac r16"].recompute == "sac"
    assert by_label["compile-budget"].recompute == "compile" and by_label["compile-budget"].memory_budget == 0.25
    assert by_label["checkpoint"].checkpoint and by_label["checkpoint"].recompute is None
    run = common.TrainingRun(common.Workload(64, 2, 1, maze=5), by_label["sac"])
    assert all(isinstance(b, common.SelectiveCheckpoint) for b in run.model.blocks)
    # the policy: matmuls and attention saved, pointwise ops recomputed
    aten = torch.ops.aten
    assert common.sac_policy(None, aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert common.sac_policy(None, aten._scaled_dot_product_flash_attention_for_cpu.default) == \
        CheckpointPolicy.MUST_SAVE
    assert common.sac_policy(None, aten.mul.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE


def _gradients(spec, workload):
    run = common.TrainingRun(workload, spec)
    run.forward().backward()
    return [p.grad.clone() for p in run.model.parameters()]


def test_sac_gradients_equal_the_plain_models():
    workload = common.Workload(64, 2, 2, maze=5)
    none, sac = common.method_specs(["sac"], [16])
    plain, selective = _gradients(none, workload), _gradients(sac, workload)
    assert len(plain) == len(selective) > 0
    for a, b in zip(plain, selective, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_step_runs_the_sac_variants(capsys):
    step.main([*TINY, "--methods", "sac", "laser+sac", "checkpoint", "--memory", "inprocess"])
    rows = table_rows(capsys.readouterr().out, "| " + " | ".join(step.HEADERS) + " |")
    assert [r[0] for r in rows] == ["none", "sac", "laser+sac r16", "checkpoint"]
    assert all(r[8] != "-" and r[10].endswith(" ms") for r in rows)  # held after forward and step time


def test_step_skips_a_compile_variant_that_cannot_finish_in_time(capsys):
    step.main([*TINY, "--methods", "compile-budget", "--memory", "off", "--compile-timeout", "0.01"])
    out = capsys.readouterr().out
    rows = table_rows(out, "| " + " | ".join(step.HEADERS) + " |")
    assert [r[0] for r in rows] == ["none", "compile-budget"] and rows[1][10] == "skipped"
    assert "compile-budget skipped: torch.compile took longer than 0.01 s (--compile-timeout)" in out


@pytest.mark.slow
def test_compile_budget_runs_one_step_and_matches_the_gradient():
    """Inductor on a CPU needs a C++ compiler; a cold compile takes about a minute on a loaded 2-core machine."""
    workload = common.Workload(64, 2, 2, maze=5)
    none, compiled, laser_compiled = common.method_specs(["compile-budget", "laser+compile-budget"], [16])
    reason = common.compile_preflight(workload, compiled, timeout=300)
    if reason is not None:
        pytest.skip(reason)
    with pytest.warns(UserWarning, match="torch.compile graph"):  # the `none` method's hooks see the graph
        compiled_gradients = _gradients(compiled, workload)
    for a, b in zip(_gradients(none, workload), compiled_gradients, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with pytest.warns(UserWarning, match="torch.compile graph"):
        run = common.TrainingRun(workload, laser_compiled)
    run.step()
    run.step()
    report = run.report()
    assert 0 < report.stored_bytes < report.raw_bytes  # LASER codes what the compiled graph saves


def test_profile_attributes_ops_by_their_library_frame():
    def chain(*names):
        event = None
        for name in reversed(names):
            event = SimpleNamespace(name=name, cpu_parent=event)
        return event

    encode = "laser/methods/laser.py(85): encode"
    # abs inside isfinite counts with isfinite, the outermost op that encode called.
    assert profile.part_of(chain("aten::abs", "aten::isfinite", "<built-in method isfinite>", encode)) == \
        "fidelity sums"
    assert profile.part_of(chain("aten::mm", "aten::matmul", encode)) == "projection"
    assert profile.part_of(chain("aten::topk", "laser/subspace.py(162): sample_rows", "aten::addmm_",
                                 "laser/methods/laser.py(112): _accumulate", encode)) == "sampling"
    assert profile.part_of(chain("aten::mm", "laser/methods/projection.py(35): decode")) == "reconstruction"
    assert profile.part_of(chain("aten::mm", "aten::linear", "laser/models/layers.py(74): forward")) is None


# ----------------------------------------------------------------------------- smoke runs


def test_step_prints_its_table(capsys):
    step.main([*TINY, "--methods", "laser-paper", "quant4", "checkpoint", "--memory", "inprocess"])
    out = capsys.readouterr().out
    rows = table_rows(out, "| " + " | ".join(step.HEADERS) + " |")
    assert [r[0] for r in rows] == ["none", "laser-paper r16", "quant4", "checkpoint"]
    assert rows[0][7] == rows[0][9] == rows[0][11] == "1.000"  # saved, held, time: peak leads, after ranks
    assert rows[1][1] == "16"
    assert float(rows[1][7]) < 1 and float(rows[2][7]) < 1  # both compress


FLOOR_HEADER = ("| method | ranks | raw | stored | floor | stored / floor | state | extra FLOPs / block | vs | "
                "time ratio floor | time ratio measured | measured overhead / floor |")


def test_floor_prints_its_table(capsys):
    floor.main([*TINY, "--methods", "laser-paper", "--sites"])
    out = capsys.readouterr().out
    rows = table_rows(out, FLOOR_HEADER)
    assert [r[0] for r in rows] == ["laser-paper r16"]
    assert rows[0][5] == "1.000"
    assert rows[0][6] not in ("-", "0 B")  # LASER's own state, beside the stored bytes the floor bounds
    assert rows[0][8] == "none"
    assert "| site | dim | tensors | rows | rank | raw | stored | floor | state | extra GFLOP |" in out


def test_floor_on_checkpointing_counts_the_region_inputs_against_checkpoint(capsys):
    floor.main([*TINY, "--methods", "laser-int8+checkpoint", "--sites"])
    out = capsys.readouterr().out
    rows = table_rows(out, FLOOR_HEADER)
    assert [r[0] for r in rows] == ["laser-int8+checkpoint r16"]
    assert rows[0][8] == "checkpoint" and "checkpoint " in out.split("ratio to the reference")[1].splitlines()[0]
    # The hooks see the 3 region inputs (25 x 64 each) of depth 2, at one site; each is projected, accumulated
    # and decoded for the rerun (nothing factored inside torch's checkpoint): 6 N D k FLOPs apiece, against
    # the block's FLOPs with the rerun forward.
    sites = table_rows(out, "| site | dim | tensors | rows | rank | raw | stored | floor | state | extra GFLOP |")
    coded = [s for s in sites if s[4] != s[1]]
    assert [(s[1], s[2], s[3], s[4]) for s in coded] == [("64", "3", "75", "16")]
    cfg = TRMConfig(hidden=64, heads=1, L_cycles=2, seq_len=25, checkpoint=True)
    share = 3 * 6 * 25 * 64 * 16 / floor.block_flops(cfg, batch=1, seq=25)
    assert rows[0][7] == f"{100 * share:.1f}%" and rows[0][9] == f"{1 + share:.3f}"


def test_profile_prints_its_tables(capsys):
    profile.main(["--dim", "64", "--depth", "2", "--rank", "16", "--batch", "1", "--maze", "5", "--steps", "2",
                  "--profiled", "1", "--threads", "1"])
    out = capsys.readouterr().out
    parts = [r[0] for r in table_rows(out, "| part | ms / step | share of method time | share of step |")]
    assert parts == [*profile.PARTS, "Python overhead (rest)", "total (encode + decode + update)"]
    runs = [r[0] for r in table_rows(out, "| run | ms / step | vs none |")]
    assert runs == ["none", "bare", "laser-paper r16"]


def test_host_prints_time_per_encoded_tensor(capsys):
    host.main(["--methods", "laser-paper", "quant8", "--depth", "2", "--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    rows = table_rows(out, "| method | step ms | stored tensors | encoded | host us / tensor over none |")
    assert [r[0] for r in rows] == ["none", "bare", "laser-paper r32", "quant8"]
    stored = {r[0]: r[2] for r in rows}
    assert stored["bare"] == "-" and stored["none"] == stored["laser-paper r32"] == stored["quant8"] != "-"
    assert 0 < int(rows[2][3]) <= int(rows[2][2]) and rows[1][4] == "-"
    with pytest.raises(SystemExit):
        host.main(["--warmup", "0"])
    assert "--warmup must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("step", ["--warmup", "0"], "--warmup must be >= 1"),
    ("floor", ["--warmup", "0"], "--warmup must be >= 1"),
    ("profile", ["--warmup", "0"], "--warmup must be >= 1"),
    ("profile", ["--profiled", "0"], "--profiled must be >= 1"),
])
def test_scripts_reject_settings_that_would_time_an_untypical_step(capsys, script, argv, message):
    with pytest.raises(SystemExit):
        {"step": step, "floor": floor, "profile": profile}[script].main(argv)
    assert message in capsys.readouterr().err


def test_fresh_process_memory_probe_sees_compression():
    spec = common.method_specs(["laser-paper"], [16])[1]
    probe = common.probe_memory_fresh(common.Workload(64, 2, 1, maze=5), spec, 2)
    assert 0 < probe["stored"] < probe["raw"]
    assert 0 < probe["held"] < probe["raw"]  # the codes, not the activations, wait for backward
    assert probe["peak"] > 100 * 2**20  # a whole Python + torch process


def test_gpu_script_dry_run_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu.sh"), "--device", "cpu", "--steps", "2", "--batch", "2", "--dims", "64",
         "--depths", "2", "--ranks", "16", "--maze", "5", "--threads", "1"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    header = "| " + " | ".join(step.HEADERS) + " |"
    rows = table_rows(proc.stdout, header)
    assert [r[0] for r in rows] == ["none", "laser r16", "laser-recon r16", "laser-paper r16", "laser-int8 r16",
                                    "laser-s8 r16", "laser-s8-int8 r16", "laser-ref r16", "checkpoint",
                                    "laser-int8+checkpoint r16", "laser-int8+coded-checkpoint r16"]
    assert "bf16 autocast" in proc.stdout
    assert "laser-int8+coded-checkpoint r16: the step's reruns (`report.recomputed`" in proc.stdout
    second = proc.stdout[proc.stdout.index(header) + len(header):]  # the fp32 target-shape table
    assert [r[0] for r in table_rows(second, header)] == ["none", "laser r16", "laser-recon r16", "checkpoint",
                                                          "laser-int8+checkpoint r16",
                                                          "laser-int8+coded-checkpoint r16"]
    assert "fp32" in second


def test_grad_probe_compares_methods_with_the_exact_gradient(tmp_path):
    import dataclasses

    from laser.train import Trainer, train_preset

    grad_probe = load("grad_probe")
    run = tmp_path / "run"
    Trainer(dataclasses.replace(train_preset("tiny"), max_steps=2, eval_every=0, grad_probe_at=(),
                                out_dir=str(run))).train()
    # tiny: 32 validation mazes, 8 batches of 4
    rows = grad_probe.probe(str(run), ["none", "laser:rank=4,min_numel=16,quantize=int8"], batch=4, batches=2,
                            warmup=1, show=["no-such-site"])
    assert [r[0] for r in rows] == ["none", "none", "laser:rank=4,min_numel=16,quantize=int8"]
    # none is exact, the reference: every tensor's cosine and sign agreement are 1
    assert rows[0][1:3] == ["1.0000", "0.0000"] and rows[0][3].startswith("1.0000 (")
    assert rows[0][4] == rows[0][6] == "1.000"
    assert -1.0 <= float(rows[2][1]) < 1.0 and float(rows[2][6]) < 1.0  # lossy, and smaller
    worst, name = rows[2][3].split(" ", 1)  # the worst tensor, by its parameter name
    assert float(worst) < 1.0 and name.strip("()").endswith(("weight", "bias")) and float(rows[2][4]) <= 1.0
    assert rows[2][7] == "-"  # a site the run does not have
    plan, spec = grad_probe.plan_spec(str(run), 0.999, batch=4, batches=2, warmup=1, per_tensor=True,
                                      start="laser:rank=4,min_numel=16,quantize=int8")
    assert plan.target.tensor_cosine == 0.999 and spec.startswith("laser:rank=4,min_numel=16,quantize=int8")
    assert plan.config.quantize == "int8" and plan.config.min_numel == 16
    assert plan.measured.tensor_cosine >= 0.999  # met, if need be by protecting every coded site
    with pytest.raises(ValueError, match="--plan-from 'quant' is invalid: budget mode plans LASER"):
        grad_probe.plan_spec(str(run), 0.999, batch=4, batches=2, warmup=1, start="quant")
    with pytest.raises(ValueError, match="--warmup 4 \\+ --batches 5 need 9 validation batches of 4"):
        grad_probe.probe(str(run), ["none"], batch=4, batches=5, warmup=4, show=[])


def test_incompressible_stops_tracking_and_prints_the_ratio(capsys):
    incompressible.main(["--width", "64", "--depth", "2", "--batch", "2", "--length", "32", "--rank", "4",
                         "--warmup", "10", "--steps", "1"])
    out = capsys.readouterr().out
    rows = {r[0]: r for r in table_rows(out, "| method | step ms | vs none | saved | kept raw because |")}
    assert list(rows) == ["bare", "none", "laser"] and rows["none"][2] == "1.000"
    assert "untracked" in rows["laser"][4]  # full-rank activations: the sites gave up tracking


def test_attention_prints_the_cosine_with_and_without_exact_qk(capsys):
    attention.main(["--dim", "64", "--depth", "2", "--batch", "2", "--rank", "8", "--warmup", "2"])
    out = capsys.readouterr().out
    rows = table_rows(out, "| method | sites coded | gradient cosine | saved / site fidelity |")
    assert [r[0] for r in rows[:2]] == ["laser r8, exact_qk=True", "laser r8, exact_qk=False"]
    assert all(-1.0 <= float(r[2]) <= 1.0 for r in rows) and len(rows) > 2  # a row per coded site


def test_maze_depth_bands_by_hand_and_its_own_depth_reproduces_the_final_evaluation(tmp_path):
    import dataclasses

    from laser.data import maze
    from laser.train import Trainer, train_preset

    maze_depth = load("maze_depth")
    targets = torch.zeros(5, 40, dtype=torch.long)
    for row, cells in enumerate([0, 3, 7, 12, 33]):  # PATH cells per maze
        targets[row, :cells] = maze.PATH
    bands = maze_depth.bands_of(targets)
    assert [(label, mask.nonzero().flatten().tolist()) for label, mask in bands] == [
        ("0-4", [0, 1]), ("5-9", [2]), ("10-19", [3]), ("30-33", [4])]  # 20-29 is empty: left out
    assert maze_depth.parse_depth("12x2") == (12, 2)
    for bad in ("12", "0x1", "ax1"):
        with pytest.raises(ValueError, match="use L_CYCLESxN_SUP|must be >= 1"):
            maze_depth.parse_depth(bad)

    run = tmp_path / "run"
    cfg = dataclasses.replace(train_preset("tiny"), max_steps=3, eval_every=0, grad_probe_at=(), out_dir=str(run))
    result = Trainer(cfg).train()
    own = (cfg.model.L_cycles, cfg.model.n_sup)
    step, header, rows = maze_depth.evaluate(str(run), [own, (own[0] + 1, 1)])
    assert step == result["steps"]  # the final checkpoint's weights
    assert [r[0] for r in rows] == [f"{own[0]}x{own[1]} (trained)", f"{own[0] + 1}x1"]  # own once, first
    assert rows[0][2] == f"{100 * result['final']['solve_rate']:.1f}%"  # the trainer's final evaluation
    assert rows[0][1] == f"{100 * result['final']['token_acc']:.2f}%"
    assert all(len(r) == len(header) for r in rows) and header[3].startswith("path 0-4 (")


def test_maze_depth_rejects_a_text_run_and_a_malformed_depth(monkeypatch, capsys):
    maze_depth = load("maze_depth")
    monkeypatch.setattr(maze_depth, "load_run", lambda path: SimpleNamespace(config=SimpleNamespace(task="text")))
    with pytest.raises(ValueError, match="trained the 'text' task; maze_depth.py reads maze runs"):
        maze_depth.evaluate("runs/text", [])
    with pytest.raises(SystemExit):
        maze_depth.main(["runs/any", "--depths", "12by2"])
    assert "--depths entry '12by2' is invalid: use L_CYCLESxN_SUP" in capsys.readouterr().err


def test_peak_profile_finds_the_tensors_alive_at_the_peak(capsys):
    from torch.profiler import ProfilerActivity, profile

    peak_profile = load("peak_profile")
    mib = 2**20
    kept = torch.ones(mib // 4)  # 1 MiB, alive before the profile: part of the start

    class Widen(torch.nn.Module):
        def forward(self, x):
            return torch.ones(2 * x.numel())

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        kept.mul_(2.0)  # seen by the profiler: a tensor that existed before it
        a = torch.ones(mib // 4)  # 1 MiB
        b = Widen()(a)  # 2 MiB: with a, the peak, inside the module's torch.ones
        del a
        c = torch.ones(mib // 8)  # 0.5 MiB, after a was freed
        del b, c
    start, peak, tensors, where = peak_profile.live_at_peak(prof, "cpu")
    assert peak - start == 3 * mib and start >= mib
    assert where[:2] == ["Widen_0", "aten::ones"], where
    assert sorted(n for (_, n, _), count in tensors.items() for _ in range(count) if n >= mib) == [mib, mib, 2 * mib]
    origins = {n: origin for (_, n, origin) in tensors if n >= mib}
    assert origins[2 * mib] == "aten::ones" and origins[mib] in ("aten::ones", "before the profile")
    peak_profile.main(["--dims", "32", "--depths", "1", "--ranks", "8", "--batch", "2", "--maze", "5",
                       "--methods", "checkpoint", "laser-int8+coded-checkpoint", "--warmup", "1"])
    out = capsys.readouterr().out
    assert out.count("alive when the step began") == 2 and "#### laser-int8+coded-checkpoint r8" in out
    assert out.count("inside: ") == 2
    coded = out.split("#### laser-int8+coded-checkpoint r8")[1]
    assert "| laser: accumulator |" in coded and "| laser: basis |" in coded  # LASER's own state, by role
    assert "| allocated in |" in coded  # (every tensor of this tiny shape is under MIN_BYTES: no origin to name)
    assert "laser:" not in out.split("#### laser-int8+coded-checkpoint r8")[0]
