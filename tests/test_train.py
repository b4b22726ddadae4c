"""Tests for laser.train: config validation and overrides, metrics, schedule, data order, exact resume,
corrupt checkpoints, every method through the same loop, the gradient probe, the comparison statistics."""

import ctypes
import dataclasses
import importlib
import json
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import laser.methods
from laser.train import (
    CheckpointError,
    DataConfig,
    TrainConfig,
    Trainer,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    cosine,
    load_checkpoint,
    parse_method_spec,
    solve_rate,
    summarize,
    token_accuracy,
    train_preset,
    valid_keys,
    welch_p_value,
    with_method,
)
from laser.train.config import parse_literal
from laser.train.trainer import (
    BatchStream,
    WarmupCosine,
    peak_memory_bytes,
    release_freed_memory,
    reset_peak_memory,
)

# laser.train re-exports the compare() function under the module's name.
compare_mod = importlib.import_module("laser.train.compare")
FAST = settings(max_examples=25, deadline=None)
# A tiny run whose LASER actually compresses (the tiny model's tensors are small).
LASER_TINY = ["method=laser", "method.rank=4", "method.min_numel=16"]


def tiny(*overrides: str) -> TrainConfig:
    return apply_overrides(train_preset("tiny"), ["grad_probe_at=()", *overrides])


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["batch=0"], "batch"),
        (["precision=fp16"], "fp32, bf16"),
        (["lr=-1"], "lr"),
        (["data.size=8"], "odd integer"),
        (["data.val_count=200"], "data.count"),
        (["warmup=-2"], "warmup"),
        (["grad_probe_at=0,1"], "grad_probe_at"),
        (["device=tpu"], "cpu"),
        (["min_lr_ratio=2"], "min_lr_ratio"),
    ],
)
def test_bad_values_fail_naming_the_key(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        apply_overrides(train_preset("tiny"), overrides)


def test_unknown_method_and_option_list_valid_ones():
    with pytest.raises(ValueError, match="laser") as err:
        TrainConfig(method="bogus")
    assert "none" in str(err.value)
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(method="laser", method_options={"bogus": 1})


def test_overrides_parse_to_field_types():
    cfg = apply_overrides(
        train_preset("tiny"),
        ["model.hidden=32", "lr=3e-4", "data.size=7", "model.checkpoint=true", "grad_probe_at=0.25,1",
         "data.cache_dir=none", "max_steps=12", "method=laser", "method.rank=8", "method.quantize=int8"],
    )
    assert cfg.model.hidden == 32 and isinstance(cfg.model.hidden, int)
    assert cfg.lr == 3e-4
    assert cfg.model.checkpoint is True
    assert cfg.grad_probe_at == (0.25, 1.0)
    assert cfg.data.cache_dir is None
    assert cfg.model.seq_len == 49  # derived from data.size
    assert cfg.method == "laser" and cfg.method_options == {"rank": 8, "quantize": "int8"}
    assert cfg.total_steps == 12


def test_a_finished_run_is_reused_whatever_the_preset_gives_other_methods(tmp_path):
    from laser.train.compare import finished_result

    def saved(cfg):
        (tmp_path / "config.json").write_text(json.dumps(config_to_dict(cfg)))
        (tmp_path / "result.json").write_text(json.dumps({"ok": 1}))

    quick = train_preset("quick")
    other = dataclasses.replace(quick, method_defaults={"laser": {"rank": 8}})
    saved(with_method(quick, "none"))
    assert finished_result(with_method(other, "none"), tmp_path) == {"ok": 1}
    saved(with_method(quick, "laser"))  # the rank merged into the run's own options still tells runs apart
    assert finished_result(with_method(other, "laser"), tmp_path) is None
    assert finished_result(with_method(quick, "laser"), tmp_path) == {"ok": 1}
    # options that build the same method config are the same run: no site_ranks and site_ranks=""
    saved(with_method(dataclasses.replace(quick, method_defaults={"laser": {"rank": 56}}), "laser"))
    assert finished_result(with_method(quick, "laser:site_ranks="), tmp_path) == {"ok": 1}
    assert finished_result(with_method(quick, "laser:site_ranks=*mlp*=8"), tmp_path) is None


def test_preset_method_defaults_apply_under_explicit_options():
    quick = train_preset("quick")
    assert with_method(quick, "laser").method_options == {"rank": 56, "site_ranks": "*mlp.down*=112"}
    assert with_method(quick, "laser:rank=8,quantize=int8").method_options == {
        "rank": 8, "site_ranks": "*mlp.down*=112", "quantize": "int8"}  # each default yields to its own option only
    uniform = with_method(quick, "laser:rank=8,site_ranks=").method_options  # a uniform rank: clear site_ranks
    assert laser.methods.make_config("laser", **uniform).site_ranks == ()
    assert with_method(quick, "none").method_options == {}
    assert apply_overrides(quick, ["method=laser", "method.quantize=int8"]).method_options == {
        "rank": 56, "site_ranks": "*mlp.down*=112", "quantize": "int8"}
    with pytest.raises(ValueError, match="valid methods"):
        TrainConfig(method_defaults={"bogus": {}})
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(method="laser", method_options={"rank": "wide"})


def test_switching_method_clears_its_options():
    cfg = apply_overrides(train_preset("tiny"), ["method=laser", "method.rank=8", "method=none"])
    assert cfg.method == "none" and cfg.method_options == {}


@pytest.mark.parametrize("key", ["bogus", "model.bogus", "model.seq_len", "data.bogus", "method.rank"])
def test_unknown_keys_list_valid_keys(key):
    with pytest.raises(ValueError, match="valid keys") as err:
        apply_overrides(train_preset("tiny"), [f"{key}=1"])
    assert "model.hidden" in str(err.value) and "lr" in str(err.value)


def test_valid_keys_include_the_method_options():
    keys = valid_keys(with_method(train_preset("tiny"), "laser"))
    assert {"lr", "model.hidden", "data.size", "method", "method.rank", "method.quantize"} <= set(keys)
    assert "model.seq_len" not in keys


def test_bad_override_values():
    with pytest.raises(ValueError, match="lr"):
        apply_overrides(train_preset("tiny"), ["lr=abc"])
    with pytest.raises(ValueError, match="true or false"):
        apply_overrides(train_preset("tiny"), ["model.checkpoint=maybe"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(train_preset("tiny"), ["lr"])


def test_presets_and_unknown_preset():
    paper = train_preset("paper")
    # The paper's Tables 3-6.
    assert (paper.model.hidden, paper.model.heads, paper.model.L_cycles, paper.model.H_cycles) == (512, 8, 24, 1)
    assert (paper.lr, paper.betas, paper.weight_decay, paper.batch, paper.epochs) == (1e-4, (0.9, 0.95), 1e-2, 64, 16)
    assert (paper.grad_clip, paper.precision) == (1.0, "bf16")
    assert (paper.data.size, paper.data.count, paper.data.val_count) == (11, 10_000, 1_000)
    assert paper.total_steps == 16 * (9_000 // 64)
    for name in ("paper-cpu", "quick", "quick11", "tiny"):
        assert train_preset(name).model.seq_len == train_preset(name).data.size ** 2
    with pytest.raises(ValueError, match="paper, paper-cpu, quick, quick11, tiny"):
        train_preset("huge")


def test_quick11_is_the_measured_recipe():
    # The run its docstring reports (results/maze11.md, m11-local8-sup4), as command-line overrides of "quick".
    run = apply_overrides(train_preset("quick"), [
        "data.size=11", "eval_every=250", "checkpoint_every=250", "model.local_heads=8", "model.n_sup=4",
        "data.curriculum_epochs=1", "max_steps=3000"])
    quick11 = train_preset("quick11")
    assert dataclasses.replace(quick11, method_defaults=run.method_defaults) == run
    # LASER as compare-quick11.md measured it: rank 32, retrying untracked sites after 50 steps
    assert with_method(quick11, "laser").method_options == {"rank": 32, "retry_after": 50}
    assert with_method(quick11, "oracle").method_options == {"rank": 32}


def test_config_round_trips_through_json():
    cfg = tiny(*LASER_TINY, "grad_probe_at=0.5")
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg
    with pytest.raises(ValueError, match="bogus"):
        config_from_dict({**config_to_dict(cfg), "bogus": 1})


def test_data_config_validation():
    with pytest.raises(ValueError, match="data.min_path"):
        DataConfig(size=5, min_path=100)


# -------------------------------------------------------------------------------------- method specs
def test_method_specs():
    spec = parse_method_spec("laser:rank=64,quantize=int8+checkpoint")
    assert (spec.name, spec.options, spec.checkpoint) == ("laser", {"rank": 64, "quantize": "int8"}, True)
    assert parse_method_spec("checkpoint") == parse_method_spec("checkpoint")
    assert (parse_method_spec("checkpoint").name, parse_method_spec("checkpoint").checkpoint) == ("none", True)
    assert parse_method_spec("none").checkpoint is False
    cfg = with_method(train_preset("tiny"), "laser:rank=4+checkpoint")
    assert cfg.model.checkpoint and cfg.method == "laser" and cfg.method_options == {"rank": 4}
    with pytest.raises(ValueError, match="valid methods"):
        parse_method_spec("bogus")
    with pytest.raises(ValueError, match="valid options"):
        parse_method_spec("laser:bogus=1")
    with pytest.raises(ValueError, match="checkpoint"):
        parse_method_spec("laser+bogus")
    coded = parse_method_spec("laser:quantize=int8+coded-checkpoint")
    assert (coded.checkpoint, coded.coded_recompute) == (True, True)
    assert parse_method_spec("laser+checkpoint").coded_recompute is False
    cfg = with_method(train_preset("tiny"), coded)
    assert cfg.model.checkpoint and cfg.model.coded_recompute and cfg.method_options == {"quantize": "int8"}
    with pytest.raises(ValueError, match="coded-checkpoint"):
        parse_method_spec("laser+checkpoint+coded-checkpoint")


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", 1), ("-3", -3), ("1.5", 1.5), ("1e-3", 1e-3), ("true", True), ("False", False), ("None", None),
     ("int8", "int8"), ("blocks.0.mlp*", "blocks.0.mlp*")],
)
def test_parse_literal(text, value):
    parsed = parse_literal(text)
    assert parsed == value and type(parsed) is type(value)


# --------------------------------------------------------------------------------------------- metrics
def test_metrics_on_hand_built_tensors():
    targets = torch.tensor([[0, 1, 4], [0, 4, 4]])
    predictions = torch.tensor([[0, 1, 4], [0, 1, 1]])
    assert token_accuracy(predictions, targets) == pytest.approx(4 / 6)
    assert solve_rate(predictions, targets) == pytest.approx(1 / 2)
    assert solve_rate(targets, targets) == 1.0
    with pytest.raises(ValueError, match="differ"):
        token_accuracy(predictions[:1], targets)


def test_cosine():
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])) == pytest.approx(1.0)
    assert cosine(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])) == pytest.approx(24 / 25)


@FAST
@given(st.integers(1, 20), st.integers(21, 200), st.floats(0.0, 0.5))
def test_warmup_cosine(warmup, total, floor):
    factor = WarmupCosine(warmup, total, floor)
    assert factor(0) == pytest.approx(1 / warmup)
    assert factor(warmup - 1) == pytest.approx(1.0)
    assert factor(warmup) == pytest.approx(1.0)
    assert factor(total) == pytest.approx(floor)
    middle = warmup + (total - warmup) / 2
    if middle.is_integer():
        assert factor(int(middle)) == pytest.approx((1 + floor) / 2)
    values = [factor(s) for s in range(warmup, total + 1)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:], strict=False))  # decays monotonically


def test_batch_stream_covers_each_epoch_and_repeats_for_deep_supervision():
    inputs = torch.arange(10).unsqueeze(1).repeat(1, 3).numpy()
    stream = BatchStream(inputs, inputs, batch=3, n_sup=2, seed=7)
    seen = []
    for _ in range(3):  # 3 full batches per epoch, each twice
        a, _, epoch, sup = stream.next()
        b, _, _, sup2 = stream.next()
        assert (sup, sup2, epoch) == (0, 1, 0) and torch.equal(a, b)
        seen += a[:, 0].tolist()
    assert len(set(seen)) == 9  # no maze twice in an epoch; the 10th is the dropped remainder
    assert stream.state_dict() == {"epoch": 1, "index": 0, "sup": 0}
    first = stream.next()[0]
    other = BatchStream(inputs, inputs, batch=3, n_sup=2, seed=7)
    other.load_state_dict({"epoch": 1, "index": 0, "sup": 0})
    assert torch.equal(other.next()[0], first)
    assert not torch.equal(torch.from_numpy(stream.order(0)), torch.from_numpy(stream.order(1)))


def test_a_paced_curriculum_draws_from_a_growing_pool_of_the_easiest_then_random_epochs_and_resumes():
    n, batch, epochs = 200, 8, 2
    inputs = np.arange(n).reshape(n, 1)
    difficulty = np.random.default_rng(0).permutation(n)  # all distinct: the easiest pool is known exactly
    stream = BatchStream(inputs, inputs, batch=batch, n_sup=1, seed=3, difficulty=difficulty,
                         curriculum_epochs=epochs)
    total = epochs * (n // batch)
    seen = [stream.next()[0][:, 0].numpy() for _ in range(total)]
    for t, rows in enumerate(seen):
        pool = max(batch, math.ceil((0.01 + 0.99 * t / total) * n))  # hand-computed linear pacing
        assert len(set(rows.tolist())) == batch and difficulty[rows].max() < pool  # the easiest `pool` only
    assert set(seen[0].tolist()) == set(np.argsort(difficulty)[:batch].tolist())  # the first: the 8 easiest
    assert difficulty[seen[-1]].max() > n / 2  # the last batches reach the hard half
    plain = BatchStream(inputs, inputs, batch=batch, n_sup=1, seed=3)
    assert np.array_equal(stream.order(epochs), plain.order(epochs))  # after it: the usual random epochs
    assert np.array_equal(stream.next()[0][:, 0].numpy(), plain.order(epochs)[:batch])
    resumed = BatchStream(inputs, inputs, batch=batch, n_sup=1, seed=3, difficulty=difficulty,
                          curriculum_epochs=epochs)
    resumed.load_state_dict({"epoch": 1, "index": 5, "sup": 0})
    assert np.array_equal(resumed.next()[0][:, 0].numpy(), seen[n // batch + 5])
    ties = [BatchStream(inputs, inputs, batch=batch, n_sup=1, seed=s, difficulty=np.zeros(n),
                        curriculum_epochs=1).next()[0][:, 0].tolist() for s in range(3)]
    assert len({tuple(sorted(t)) for t in ties}) == 3  # equal difficulty enters the pool in a seeded order
    with pytest.raises(ValueError, match="data.curriculum_epochs=-1"):
        apply_overrides(train_preset("tiny"), ["data.curriculum_epochs=-1"])


def test_peak_memory_is_at_least_a_tensor_we_hold():
    held = torch.ones(4 * 2**20, dtype=torch.float64)  # 32 MiB
    assert peak_memory_bytes(torch.device("cpu")) > held.numel() * held.element_size()


@pytest.mark.skipif(not reset_peak_memory(torch.device("cpu")), reason="peak RSS cannot be reset here (no "
                    "/proc/self/clear_refs): the step peak is then the process peak")
def test_the_step_peak_leaves_out_what_the_probes_allocate(monkeypatch):
    big = 256 * 2**20  # a probe holding 256 MiB: the process peak sees it, the training steps' peak must not
    real_probe = Trainer.gradient_probe

    def heavy_probe(self, sites=True):
        ballast = torch.ones(big // 8, dtype=torch.float64)
        out = real_probe(self, sites)
        del ballast
        return out

    monkeypatch.setattr(Trainer, "gradient_probe", heavy_probe)
    result = Trainer(apply_overrides(train_preset("tiny"), ["grad_probe_at=(0.5,)"])).train()
    assert result["peak_memory_bytes"] - result["peak_step_memory_bytes"] > big * 0.9
    assert result["peak_step_memory_bytes"] > 0


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_trim") or not os.path.exists("/proc/self/status"),
                    reason="no glibc malloc_trim or no /proc here: release_freed_memory does nothing")
def test_release_freed_memory_hands_the_freed_heap_back():
    base = _rss_bytes()
    small = [torch.ones(8192) for _ in range(8000)]  # 32 KiB each: the heap, under glibc's mmap threshold
    pin = torch.ones(8192)  # allocated above them: free() alone cannot trim the heap's top back to the OS
    del small
    held = _rss_bytes() - base
    if held < 200 * 2**20:
        pytest.skip(f"this allocator returned the freed heap itself ({held / 2**20:.0f} MiB still held)")
    release_freed_memory()
    assert _rss_bytes() - base < held / 2  # most of the 250 MiB are back with the OS
    del pin


# --------------------------------------------------------------------------------------------- training
def _weights(trainer: Trainer) -> dict:
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    for i, s in trainer.opt.state_dict()["state"].items():
        state |= {f"opt.{i}.{k}": v for k, v in s.items() if torch.is_tensor(v)}
    return state


def test_resume_is_bitwise_identical(tmp_path):
    cfg = tiny(*LASER_TINY, "checkpoint_every=2")
    whole = Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "whole")))
    whole.train()
    first = Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "split")))
    first.train(until=3)  # mid-batch: n_sup=2, so the carry must travel in the checkpoint
    assert first.step == 3 and first.carry is not None
    second = Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "split")), resume=True)
    assert second.step == 3
    second.train()
    a, b = _weights(whole), _weights(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert whole.method.state_dict()["extra"]["sites"].keys() == second.method.state_dict()["extra"]["sites"].keys()
    for site, state in whole.method.state_dict()["extra"]["sites"].items():
        assert torch.equal(state["basis"], second.method.state_dict()["extra"]["sites"][site]["basis"]), site
    assert whole.result()["final"] == second.result()["final"]
    lines = [json.loads(s) for s in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    whole_lines = [json.loads(s) for s in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in whole_lines]
    assert [r.get("loss") for r in lines] == [r.get("loss") for r in whole_lines]


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = tiny(f"out_dir={tmp_path}", "max_steps=2")
    Trainer(cfg).train()
    with pytest.raises(CheckpointError, match="lr"):
        Trainer(dataclasses.replace(cfg, lr=0.5), resume=True)


def test_corrupt_or_truncated_checkpoint_fails_clearly(tmp_path):
    cfg = tiny(f"out_dir={tmp_path}", "max_steps=2")
    Trainer(cfg).train()
    path = tmp_path / "checkpoint.pt"
    assert load_checkpoint(path)["step"] == 2
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Trainer(cfg, resume=True)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    torch.save({"format": 999}, path)
    with pytest.raises(CheckpointError, match="not a laser training checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", laser.methods.names())
def test_the_same_loop_trains_every_method(name):
    trainer = Trainer(tiny(f"method={name}", "max_steps=2", "eval_every=0", "grad_probe_at=1.0"))
    result = trainer.train()
    assert result["steps"] == 2 and result["method"] == name
    assert -1 <= result["grad_cosine"][-1]["model"] <= 1 + 1e-9
    assert math.isfinite(result["curves"]["train"][-1]["loss"])
    assert 0 <= result["final"]["token_acc"] <= 1
    assert result["raw_activation_bytes"] > 0
    if name == "none":
        assert result["activation_bytes"] == result["raw_activation_bytes"]
    assert sum(trainer.model.state_dict()["head.weight"].shape) > 0


def test_checkpointing_model_option_gives_the_same_loss():
    plain = Trainer(tiny("max_steps=1")).train()
    recompute = Trainer(tiny("max_steps=1", "model.checkpoint=true")).train()
    assert recompute["curves"]["train"][-1]["loss"] == pytest.approx(plain["curves"]["train"][-1]["loss"], rel=1e-6)
    assert recompute["activation_bytes"] < plain["activation_bytes"]
    coded = Trainer(tiny("max_steps=2", "model.checkpoint=true", "model.coded_recompute=true")).train()
    twice = Trainer(tiny("max_steps=2", "model.checkpoint=true")).train()
    assert [c["loss"] for c in coded["curves"]["train"]] == pytest.approx(
        [c["loss"] for c in twice["curves"]["train"]], rel=1e-6)  # method none: the rebuilt tensors kept raw
    trainer = Trainer(tiny(*LASER_TINY, "method.policy=paper", "max_steps=2", "model.checkpoint=true",
                           "model.coded_recompute=true"))
    trainer.train()
    rebuilt = trainer.method.report().recomputed
    assert rebuilt and sum(r.stored_bytes for r in rebuilt) < sum(r.raw_bytes for r in rebuilt)


def test_result_contents_and_metrics_file(tmp_path):
    cfg = tiny(*LASER_TINY, f"out_dir={tmp_path}", "grad_probe_at=0.5,1")
    result = Trainer(cfg).train()
    assert result["final"]["count"] == cfg.data.val_count
    assert result["trivial_solve_rate"] == pytest.approx(
        sum(int((i == t).all()) for i, t in zip(*_val(cfg), strict=True)) / cfg.data.val_count
    )
    assert [e["step"] for e in result["curves"]["eval"]] == [4, 8]
    assert 0 < result["activation_bytes"] < result["raw_activation_bytes"]
    assert result["report"]["stored_bytes"] == result["activation_bytes"]
    assert result["median_step_seconds"] > 0 and 0 < result["compression_share"] < 1
    assert [p["step"] for p in result["grad_cosine"]] == [4, 8]
    assert all(-1 <= p["model"] <= 1 for p in result["grad_cosine"])
    assert [bool(p["sites"]) for p in result["grad_cosine"]] == [False, True]  # per-site cosines at the last probe
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8]
    assert {"epoch", "lr", "token_acc", "stored_bytes", "raw_bytes", "step_seconds", "sites"} <= set(train_records[0])
    site = next(iter(train_records[-1]["sites"].values()))
    assert {"rank", "fidelity"} <= set(site)
    assert config_from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg


def _val(cfg: TrainConfig):
    from laser.data import maze

    split = maze.load_split(cfg.data.size, cfg.data.count, cfg.data.val_count, cfg.data.seed)
    return split.val_inputs, split.val_targets


def test_gradient_probe_is_exact_without_compression_and_not_with_it():
    exact = Trainer(tiny("max_steps=1"))
    exact.train()
    probe = exact.gradient_probe()
    assert probe["model"] == pytest.approx(1.0, abs=1e-12) and probe["sites"] == {}
    assert probe["worst_tensor"]["cosine"] == pytest.approx(1.0, abs=1e-12) and probe["sign_agreement"] == 1.0
    lossy = Trainer(tiny(*LASER_TINY, "method.rank=1", "method.policy=paper", "max_steps=2"))
    lossy.train()
    before = lossy.method.state_dict()
    probe = lossy.gradient_probe()
    assert probe["model"] < 0.999999 and probe["sites"]
    # the least faithful tensor is a named parameter, not exact, and some signs flip
    assert probe["worst_tensor"]["name"] in dict(lossy.model.named_parameters())
    assert probe["worst_tensor"]["cosine"] < 0.999999 and probe["sign_agreement"] < 1.0
    assert all(-1 <= c <= 1 for c in probe["sites"].values())
    after = lossy.method.state_dict()  # the running method is untouched by the probes
    assert before["steps"] == after["steps"]
    for site in before["extra"]["sites"]:
        assert torch.equal(before["extra"]["sites"][site]["basis"], after["extra"]["sites"][site]["basis"])


def test_paper_preset_trains_one_step_on_cpu_with_batch_1():
    cfg = apply_overrides(
        train_preset("paper"),
        ["batch=1", "max_steps=1", "data.count=6", "data.val_count=2", "grad_probe_at=()", "device=cpu",
         "eval_every=0", "checkpoint_every=0"],
    )
    trainer = Trainer(cfg)
    assert sum(p.numel() for p in trainer.model.parameters()) == 3_412_992  # the paper's ~3.4M
    result = trainer.train()
    assert result["steps"] == 1 and math.isfinite(result["curves"]["train"][-1]["loss"])
    assert result["precision"] == "fp32"  # bf16 autocast only where the device runs it natively


# ------------------------------------------------------------------------------------------- statistics
def test_summarize_and_welch():
    stat = summarize([1.0, 2.0, 3.0])
    assert stat == {"mean": 2.0, "std": 1.0, "per_seed": [1.0, 2.0, 3.0]}
    assert summarize([5.0])["std"] == 0.0
    assert welch_p_value([0.1], [0.2]) is None
    assert welch_p_value([1.0, 1.0], [1.0, 1.0]) is None  # no variance: undefined
    assert welch_p_value([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    # t = (2 - 12) / sqrt(1/3 + 1/3) = -12.25 with 4 degrees of freedom: p = 2.5e-4
    assert welch_p_value([1.0, 2.0, 3.0], [11.0, 12.0, 13.0]) == pytest.approx(2.5e-4, rel=0.05)


def _entry(memory: float, time: float, solve: list[float], p: float | None, cos: float,
           curve: tuple[float, ...] = ()) -> dict:
    return {"activation_bytes": summarize([memory]), "activation_ratio": summarize([memory / 100.0]),
            "step_time_ratio": summarize([time]), "solve_rate": summarize(solve), "p_value": p,
            "gradient_cosine": {"model": summarize([cos]), "curve": [{"step": 10 * (i + 1), "model": summarize([c])}
                                                                     for i, c in enumerate(curve)]}}


def test_pareto_front_and_axis_winners():
    results = {
        "none": _entry(100.0, 1.0, [0.5, 0.6], None, 1.0, (1.0, 1.0)),
        "small": _entry(10.0, 1.5, [0.1, 0.1], 0.01, 0.2, (0.9, 0.2)),  # least memory, accuracy lost
        "good": _entry(30.0, 1.4, [0.5, 0.58], 0.8, 0.99, (0.99,)),  # accuracy kept
        "worse": _entry(40.0, 1.6, [0.4, 0.5], 0.3, 0.98),  # beaten by "good" on every axis
        "twin": _entry(30.0, 1.4, [0.5, 0.58], 0.8, 0.99),  # equal to "good": neither dominates
    }
    assert compare_mod.pareto_front(results) == ["none", "small", "good", "twin"]
    assert compare_mod.keeps_accuracy(results["good"], results["none"])
    assert not compare_mod.keeps_accuracy(results["small"], results["none"])
    assert compare_mod.keeps_accuracy(_entry(1.0, 1.0, [0.7], None, 1.0), results["none"])  # higher mean
    assert not compare_mod.keeps_accuracy(_entry(1.0, 1.0, [0.2], None, 1.0), results["none"])  # no test: mean
    lines = "\n".join(compare_mod.axis_winners(results, "none"))
    # One seed of memory, time and cosine: no test, so no winner is named on those axes (the baseline is a
    # candidate on each; tests/test_report_honesty.py covers the lines with enough seeds).
    assert "least activation memory: the seeds cannot tell **small** (0.100" in lines
    assert "not significantly below the baseline's (Welch p >= 0.05 or a higher mean): **good** (0.300" in lines
    assert "fastest: the seeds cannot tell the baseline **none**" in lines
    assert "most faithful gradients: the seeds cannot tell the baseline **none** (cosine 1.0000) from **good**" in lines
    assert ("Pareto front (activation memory, step time, solve rate; means, the baseline included): "
            "**none** (baseline), **small**, **good**, **twin**") in lines
    table = compare_mod.gradient_curve_table(results)
    assert table[0] == "| method | step 10 | step 20 |"
    assert table[3] == "| small | 0.9000 ± 0.0000 | 0.2000 ± 0.0000 |"
    assert table[4] == "| good | 0.9900 ± 0.0000 | - |"
    assert compare_mod.axis_winners({"none": results["none"]}, "none") == []
