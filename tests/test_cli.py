"""Tests for the `laser` command: train and compare on the tiny preset, and every documented usage error."""

import dataclasses
import json
import os

import pytest

import laser.methods
from laser.cli import COMMANDS, main, split_methods
from laser.train.config import config_to_dict

CONTRACT = ("activation_bytes", "peak_memory_bytes", "step_time_ratio", "token_acc", "solve_rate")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compare_smoke_writes_report_and_results(tmp_path, capsys):
    out = tmp_path / "cmp"
    methods = ["none", "laser:rank=4,min_numel=16,quantize=int8"]
    code, stdout, _ = run_cli(["compare", "--preset", "tiny", "--methods", ",".join(methods), "--seeds", "2",
                               "--jobs", "2", "--set", "grad_probe_at=1.0", "--out", str(out)], capsys)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == methods
    for label, entry in results.items():
        for key in CONTRACT:
            assert set(entry[key]) == {"mean", "std", "per_seed"}, (label, key)
            assert len(entry[key]["per_seed"]) == 2
        assert 0 <= entry["trivial_solve_rate"] <= 1
        assert "p_value" in entry and "p_value_token_acc" in entry
        assert {"test", "min_detectable_difference", "min_detectable_difference_token_acc"} <= set(entry)
        assert entry["peak_memory_bytes"]["mean"] > 2**20
        assert set(entry["gradient_cosine"]) == {"model", "curve", "sites"}
        assert 0 <= entry["compression_share"]["mean"] < 1
    base, lossy = results["none"], results[methods[1]]
    assert base["p_value"] is None and base["step_time_ratio"]["per_seed"] == [1.0, 1.0]
    assert base["test"] is None and lossy["test"].startswith("Welch t-test")
    assert base["activation_ratio"]["mean"] == 1.0
    assert lossy["activation_bytes"]["mean"] < base["activation_bytes"]["mean"]
    assert base["gradient_cosine"]["model"]["mean"] == pytest.approx(1.0, abs=1e-12)
    report = (out / "report.md").read_text()
    for label in methods:
        assert f"| {label}" in report
    assert "Trivial solve rate" in report and "Wall time" in report
    assert "## Accuracy against the baseline" in report and "smallest detectable" in report
    winners = report.split("## Who wins on which axis")[1].split("\n## ")[0].splitlines()
    for axis in ("fastest", "most faithful gradients", "highest solve rate"):  # the baseline is on every line
        assert "the baseline **none**" in next(line for line in winners if line.startswith(f"- {axis}: ")), axis
    for png in ("val_curves.png", "activation_memory.png", "ranks.png", "pareto.png", "grad_cosine.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert f"({png})" in report
    config = json.loads((out / "config.json").read_text())
    assert config["seeds"] == [100, 101] and config["methods"] == methods
    assert "| method |" in stdout and "resolved config" in stdout


def test_compare_resume_reuses_only_runs_finished_with_the_same_settings(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--preset", "tiny", "--methods", "none", "--seeds", "1", "--jobs", "1",
            "--set", "grad_probe_at=()", "--set", "max_steps=2", "--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    result = out / "runs" / "none" / "seed100" / "result.json"
    first = result.read_text()
    stamp = result.stat().st_mtime_ns
    code, stdout, _ = run_cli([*args, "--resume"], capsys)
    assert code == 0 and "resume: 1 of 1 run(s) already finished" in stdout
    assert result.stat().st_mtime_ns == stamp and result.read_text() == first  # not trained again
    assert "1 run(s) reused" in (out / "report.md").read_text()
    relative = [a if a != str(out) else os.path.relpath(out) for a in args]  # the same folder by another path
    assert "resume: 1 of 1 run(s) already finished" in run_cli([*relative, "--resume"], capsys)[1]
    config_path = out / "runs" / "none" / "seed100" / "config.json"
    saved = json.loads(config_path.read_text())
    del saved["data"]["curriculum_epochs"]  # a run saved before this setting existed: its default then
    config_path.write_text(json.dumps(saved))
    assert "resume: 1 of 1 run(s) already finished" in run_cli([*args, "--resume"], capsys)[1]
    assert result.stat().st_mtime_ns == stamp
    code, stdout, _ = run_cli([*args, "--resume", "--set", "lr=1e-4"], capsys)  # other settings: retrained
    assert code == 0 and "resume: 0 of 1 run(s)" in stdout
    assert json.loads((out / "runs" / "none" / "seed100" / "config.json").read_text())["lr"] == 1e-4
    assert result.stat().st_mtime_ns != stamp


def test_compare_resume_continues_an_interrupted_run_from_its_checkpoint(tmp_path, capsys):
    from laser.train.config import config_from_dict
    from laser.train.trainer import Trainer

    def args(out):
        return ["compare", "--preset", "tiny", "--methods", "laser", "--seeds", "1", "--jobs", "1",
                "--set", "grad_probe_at=()", "--set", "max_steps=4", "--set", "checkpoint_every=2", "--out", str(out)]

    assert run_cli(args(tmp_path / "whole"), capsys)[0] == 0
    whole = json.loads((tmp_path / "whole" / "runs" / "laser" / "seed100" / "result.json").read_text())
    run = tmp_path / "cut" / "runs" / "laser" / "seed100"  # the same run, stopped after 3 of its 4 steps
    planned = json.loads((tmp_path / "whole" / "runs" / "laser" / "seed100" / "config.json").read_text())
    cfg = config_from_dict({**planned, "out_dir": str(run)})
    Trainer(cfg).train(until=3)
    code, stdout, _ = run_cli([*args(tmp_path / "cut"), "--resume"], capsys)
    assert code == 0 and "resume: 0 of 1 run(s) already finished" in stdout
    assert "resumed at step 3 of 4" in (run / "worker.log").read_text()
    resumed = json.loads((run / "result.json").read_text())
    assert resumed["final"] == whole["final"] and resumed["steps"] == 4
    assert resumed["activation_bytes"] == whole["activation_bytes"]
    def logged(folder):
        return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert logged(run) == logged(tmp_path / "whole" / "runs" / "laser" / "seed100")  # no step lost or twice


def test_compare_resume_starts_over_a_run_interrupted_with_other_settings(tmp_path, capsys):
    from laser.train.config import config_from_dict
    from laser.train.trainer import CHECKPOINT_NAME, Trainer

    out = tmp_path / "cmp"
    args = ["compare", "--preset", "tiny", "--methods", "none", "--seeds", "1", "--jobs", "1",
            "--set", "grad_probe_at=()", "--set", "max_steps=2", "--out", str(out)]
    assert run_cli(args, capsys)[0] == 0
    run = out / "runs" / "none" / "seed100"
    planned = json.loads((run / "config.json").read_text())
    (run / "result.json").unlink()
    other = config_from_dict({**planned, "lr": planned["lr"] / 2, "out_dir": str(run)})
    Trainer(other).train(until=1)  # interrupted, with another learning rate
    code, stdout, _ = run_cli([*args, "--resume"], capsys)
    assert code == 0 and "resumed" not in (run / "worker.log").read_text()  # trained anew, from step 0
    assert json.loads((run / "config.json").read_text())["lr"] == planned["lr"]
    assert (run / CHECKPOINT_NAME).is_file() and json.loads((run / "result.json").read_text())["steps"] == 2


def test_run_worker_removes_a_checkpoint_of_other_settings_before_it_trains(tmp_path, monkeypatch):
    import importlib
    import subprocess

    from laser.train.config import config_from_dict
    from laser.train.trainer import CHECKPOINT_NAME, write_json

    compare = importlib.import_module("laser.train.compare")  # the module, not the function laser.train exports
    cfg = config_from_dict({"out_dir": str(tmp_path)})
    launches = []

    def launch(command, **_):  # what the worker would start with, and whether the old checkpoint is still there
        launches.append((command[-1] == "--resume", (tmp_path / CHECKPOINT_NAME).exists()))
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(compare.subprocess, "run", launch)
    write_json(tmp_path / "config.json", config_to_dict(dataclasses.replace(cfg, lr=cfg.lr / 2)))
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"a run cut with another learning rate")
    with pytest.raises(RuntimeError, match="failed"):
        compare.run_worker(cfg, tmp_path, resume=True)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"a run cut with these settings")  # config.json is cfg's now
    with pytest.raises(RuntimeError, match="failed"):
        compare.run_worker(cfg, tmp_path, resume=True)
    assert launches == [(False, False), (True, True)]  # a cut fresh run can never be resumed from the stale one


def test_train_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["train", "--preset", "tiny", "--method", "laser:rank=4", "--set", "max_steps=4",
                               "--set", "grad_probe_at=()", "--out", str(out)], capsys)
    assert code == 0 and "solve rate" in stdout and "trivial" in stdout
    assert (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists()
    code, _, err = run_cli(["train", "--preset", "tiny", "--method", "laser:rank=4", "--set", "max_steps=4",
                            "--set", "grad_probe_at=()", "--out", str(out)], capsys)
    assert code == 2 and "--resume" in err
    code, stdout, _ = run_cli(["train", "--preset", "tiny", "--method", "laser:rank=4", "--set", "max_steps=4",
                               "--set", "grad_probe_at=()", "--out", str(out), "--resume"], capsys)
    assert code == 0 and "resumed at step 4" in stdout


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["train", "--preset", "huge"], ["invalid choice", "quick", "paper-cpu"]),
        (["compare", "--preset", "huge"], ["invalid choice", "tiny"]),
        (["train", "--preset", "tiny", "--set", "bogus=1"], ["bogus", "model.hidden", "lr"]),
        (["train", "--preset", "tiny", "--set", "lr=abc"], ["lr", "number"]),
        (["train", "--preset", "tiny", "--set", "lr"], ["key=value"]),
        (["train", "--preset", "tiny", "--method", "bogus"], ["bogus", *laser.methods.names()]),
        (["train", "--preset", "tiny", "--method", "laser:bogus=1"], ["bogus", "rank", "quantize"]),
        (["train", "--preset", "tiny", "--method", "laser:rank=0"], ["rank"]),
        (["compare", "--preset", "tiny", "--methods", "none,bogus"], ["bogus", "laser"]),
        (["compare", "--preset", "tiny", "--methods", "laser:bogus=2"], ["bogus", "rank"]),
        (["compare", "--preset", "tiny", "--set", "method.rank=3"], ["method.rank", "valid keys"]),
        (["compare", "--preset", "tiny", "--seeds", "0"], ["--seeds"]),
        (["bogus"], ["invalid choice", "train", "compare"]),
    ],
)
def test_usage_errors_exit_2_listing_valid_values(argv, needles, capsys, tmp_path):
    code, _, err = run_cli([*argv, "--out", str(tmp_path)] if argv[0] != "bogus" else argv, capsys)
    assert code == 2
    for needle in needles:
        assert needle in err, (needle, err)


def test_split_methods():
    assert split_methods("none,laser,laser:quantize=int8") == ["none", "laser", "laser:quantize=int8"]
    assert split_methods("laser:rank=64,quantize=int8,quant:bits=2,none+checkpoint") == [
        "laser:rank=64,quantize=int8", "quant:bits=2", "none+checkpoint"]
    assert split_methods("laser:rank=4,quantize=int8+checkpoint, static") == [
        "laser:rank=4,quantize=int8+checkpoint", "static"]


def test_subcommands_register_in_one_table():
    assert {"train", "compare"} <= set(COMMANDS)
    add_arguments, run = COMMANDS["compare"]
    assert callable(add_arguments) and callable(run)


def test_analyze_is_registered_and_names_the_missing_checkpoint(tmp_path, capsys):
    from laser.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "checkpoint.pt" in capsys.readouterr().err
