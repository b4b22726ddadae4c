"""The text task: the stdlib byte corpus (determinism, split by file, cache), the looped LM (shapes, sizes by
hand, causality, weight tying, recomputation, a hook-free twin), the trainer, compare and analyze on it."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import math

import numpy as np
import pytest
import torch

import laser
import laser.methods
from laser.data import text
from laser.models.looped_lm import PRESETS, LoopedLM, LoopedLMConfig, preset
from laser.models.trm import count_parameters
from laser.train import Trainer, apply_overrides, config_from_dict, config_to_dict, train_preset
from laser.train.tasks import BITS_PER_BYTE, TASKS, WindowStream

# laser.train re-exports the compare() function under the module's name.
compare_mod = importlib.import_module("laser.train.compare")

# A tiny run on the text-tiny preset without the gradient probe (a few steps take well under a second).
TINY = ["grad_probe_at=()"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: steady on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_stdlib(root, files: dict[str, bytes]):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


FILES = {f"pkg{i % 3}/mod{i}.py": f"# module {i}\n".encode() + bytes(1 + j % 255 for j in range(40 + 7 * i))
         for i in range(40)}


# ------------------------------------------------------------------------------------------------- corpus
def test_split_is_by_whole_file_and_hashes_the_contents(tmp_path):
    root = fake_stdlib(tmp_path / "lib", {**FILES, "test/test_x.py": b"skip", "site-packages/y.py": b"skip",
                                          "notes.txt": b"not python"})
    split = text.build_split(max_bytes=10**6, val_fraction=0.3, root=root)
    assert set(split.train_files) | set(split.val_files) == set(FILES)  # test suites and site-packages left out
    assert not set(split.train_files) & set(split.val_files)
    for name in split.val_files:
        assert text.is_validation(name, 0.3)
    for name in split.train_files:
        assert not text.is_validation(name, 0.3)
    # Each side is its files in stream order, each followed by one separator byte.
    expected_val = b"".join(FILES[name] + b"\0" for name in split.val_files)
    assert split.val.tobytes() == expected_val
    assert int((split.train == text.SEPARATOR).sum()) == len(split.train_files)
    assert 0 < len(split.val_files) < len(split.train_files)
    # The content hash covers every chosen path and its bytes, in hash order.
    digest = hashlib.sha256()
    for name in sorted(FILES, key=lambda p: hashlib.sha256(p.encode()).hexdigest()):
        digest.update(name.encode() + b"\0" + len(FILES[name]).to_bytes(8, "little") + FILES[name])
    assert split.content_hash == digest.hexdigest()
    # Changing one byte of one file changes the hash.
    name = split.train_files[0]
    (root / name).write_bytes(FILES[name][:-1] + b"\x7f")
    assert text.build_split(10**6, 0.3, root).content_hash != split.content_hash


def test_size_cap_takes_whole_files_in_hash_order(tmp_path):
    root = fake_stdlib(tmp_path / "lib", FILES)
    sizes = {name: len(data) for name, data in FILES.items()}
    cap = sum(sizes.values()) // 2
    chosen = text.choose_files(sizes, cap)
    assert sum(sizes[name] + 1 for name in chosen) <= cap
    order = sorted(sizes, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    assert chosen == [name for name in order if name in chosen]  # hash order kept
    skipped = [name for name in order if name not in chosen]
    assert all(sum(sizes[c] + 1 for c in chosen) + sizes[s] + 1 > cap for s in skipped)  # none would fit
    split = text.build_split(cap, 0.3, root)
    assert len(split.train) + len(split.val) <= cap
    with pytest.raises(ValueError, match="no file on one side"):
        text.build_split(1024, 0.3, fake_stdlib(tmp_path / "one", {"a.py": b"x" * 10}))


def test_real_stdlib_corpus_is_deterministic():
    a = text.build_split(max_bytes=65_536, val_fraction=0.1)
    b = text.build_split(max_bytes=65_536, val_fraction=0.1)
    assert a.content_hash == b.content_hash and np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.python == text.python_version() and a.train.dtype == np.uint8
    assert len(a.train) + len(a.val) <= 65_536 and len(a.val) > 0


def test_cache_round_trips_and_rebuilds_when_the_files_or_python_differ(tmp_path, monkeypatch):
    root = fake_stdlib(tmp_path / "lib", FILES)
    cache = tmp_path / "cache"
    first = text.load_split(10**6, 0.3, cache, root)
    (path,) = cache.glob("*.npz")
    assert f"py{text.python_version()}" in path.name
    again = text.load_split(10**6, 0.3, cache, root)
    assert again.content_hash == first.content_hash and np.array_equal(again.train, first.train)
    # Another Python (a different version string) writes and reads its own file; the old one is not trusted.
    monkeypatch.setattr(text, "python_version", lambda: "0.0.1")
    assert text._read_cache(path, text._manifest(root, 10**6)) is None
    monkeypatch.undo()
    # A changed file (another size) changes the manifest: the cache is rebuilt with the new bytes.
    (root / "pkg0/mod0.py").write_bytes(b"# changed\n")
    rebuilt = text.load_split(10**6, 0.3, cache, root)
    assert rebuilt.content_hash != first.content_hash
    assert rebuilt.content_hash == text.build_split(10**6, 0.3, root).content_hash
    # A damaged cache is rebuilt too.
    path.write_bytes(b"garbage")
    assert text.load_split(10**6, 0.3, cache, root).content_hash == rebuilt.content_hash


def test_windows_and_unigram_by_hand():
    stream = np.arange(10, dtype=np.uint8)
    inputs, targets = text.windows(stream, 3)
    assert inputs.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and targets.tolist() == [[1, 2, 3], [4, 5, 6],
                                                                                           [7, 8, 9]]
    assert text.windows(stream, 3, count=1)[0].tolist() == [[0, 1, 2]]
    x, y = text.random_windows(stream, 4, 5, np.random.default_rng(0))
    assert x.shape == y.shape == (5, 4) and (y == x + 1).all()  # consecutive bytes: target = input + 1
    train, val = np.array([1, 1, 2], dtype=np.uint8), np.array([1, 2], dtype=np.uint8)
    p1, p2 = 3 / 259, 2 / 259  # add-one counts over 256 byte values
    assert text.unigram_bits_per_byte(train, val) == pytest.approx(-(math.log2(p1) + math.log2(p2)) / 2)


def test_window_stream_is_a_function_of_seed_and_step():
    data = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    a, b = WindowStream(data, 16, 4, seed=3), WindowStream(data, 16, 4, seed=3)
    first = [a.next()[0] for _ in range(3)]
    b.load_state_dict({"step": 2})
    assert torch.equal(b.next()[0], first[2])
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(WindowStream(data, 16, 4, seed=4).next()[0], first[0])


# -------------------------------------------------------------------------------------------------- model
def test_shapes_and_parameter_counts_by_hand():
    for name, cfg in PRESETS.items():
        model = LoopedLM(cfg)
        d, i, v = cfg.hidden, cfg.inter, cfg.vocab
        block = 3 * d * d + d * d + 2 * i * d + i * d  # qkv, o, gate_up, down
        assert count_parameters(model) == 2 * v * d + cfg.layers * block, name
    assert count_parameters(LoopedLM(preset("text-paper"))) == 3_670_016  # D=512, SwiGLU 1536, 256 bytes
    assert preset("text-paper").inter == 1536 and preset("text-paper").loops == 24
    model = LoopedLM(preset("text-tiny"))
    logits = model(torch.randint(0, 256, (3, 17)))
    assert logits.shape == (3, 17, 256) and logits.dtype == torch.float32


def test_bad_configs_and_inputs_raise():
    with pytest.raises(ValueError, match="head dim"):
        LoopedLMConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="loops"):
        LoopedLMConfig(loops=0)
    model = LoopedLM(preset("text-tiny"))
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="unknown"):
        preset("huge")


def test_causal_future_bytes_do_not_change_past_logits():
    torch.manual_seed(0)
    model = LoopedLM(preset("text-tiny"))
    x = torch.randint(0, 256, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 256, (2, 8))
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_blocks_are_weight_tied_across_loops():
    cfg = dataclasses.replace(preset("text-tiny"), layers=2, loops=5)
    model = LoopedLM(cfg)
    calls = {name: 0 for name in ("blocks.0", "blocks.1")}
    for name in calls:
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name,
                                                                                                     calls[name] + 1))
    model(torch.randint(0, 256, (1, 8)))
    assert calls == {"blocks.0": 5, "blocks.1": 5}
    more = LoopedLM(dataclasses.replace(cfg, loops=9))
    assert count_parameters(more) == count_parameters(model)  # depth adds no weights


def test_checkpointing_matches_and_saves_less():
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("text-tiny"), loops=4)
    plain, ckpt = LoopedLM(cfg), LoopedLM(dataclasses.replace(cfg, checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (2, 33))
    losses = []
    for model in (plain, ckpt):
        comp = laser.methods.build("none", model)
        with comp:
            loss = model.loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        losses.append((loss, comp.report().stored_bytes))
        comp.remove()
    assert torch.equal(losses[0][0], losses[1][0])
    assert losses[1][1] < losses[0][1] / 2
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def _loss_and_grads(model: LoopedLM, x: torch.Tensor, method=None):
    model.zero_grad()
    if method is None:
        loss = model.loss(model(x[:, :-1]), x[:, 1:])
    else:
        with method:
            loss = model.loss(model(x[:, :-1]), x[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_hook_free_twin_equal_without_compression_and_close_with_exact_low_rank():
    torch.manual_seed(0)
    model = LoopedLM(preset("text-tiny"))
    twin = copy.deepcopy(model)
    x = torch.randint(0, 256, (4, 33))
    twin_loss, twin_grads = _loss_and_grads(twin, x)
    # Accounting only: the same loss bit for bit and the same gradients.
    none = laser.methods.build("none", model)
    loss, grads = _loss_and_grads(model, x, none)
    none.remove()
    assert torch.equal(loss, twin_loss)
    for a, b in zip(grads, twin_grads, strict=True):
        assert torch.equal(a, b)
    # LASER at a rank no site reaches after warm-up: the forward is untouched (loss bitwise), gradients allclose.
    comp = laser.Compressor(model, laser.LaserConfig(rank=256, max_rank=256, min_numel=0))
    for _ in range(2):
        _loss_and_grads(model, x, comp)
        comp.step()
    loss, grads = _loss_and_grads(model, x, comp)
    assert torch.equal(loss, twin_loss)
    for a, b in zip(grads, twin_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # A low rank really codes: same loss, bytes saved, gradients no longer equal.
    low = laser.Compressor(model, laser.LaserConfig(rank=2, max_rank=2, min_numel=0, policy="paper",
                                                    exact_qk=False))
    for _ in range(2):
        _loss_and_grads(model, x, low)
        low.step()
    loss, grads = _loss_and_grads(model, x, low)
    assert torch.equal(loss, twin_loss)
    report = low.report()  # at this size LASER's own state (row samples) outweighs what the codes save
    assert sum(row.stored_bytes - row.state_bytes for row in report.sites) < report.raw_bytes
    assert min(row.fidelity for row in report.sites) < 0.9
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, twin_grads, strict=True))


# ------------------------------------------------------------------------------------------------ trainer
def test_text_config_validates_and_round_trips():
    cfg = train_preset("text-tiny")
    assert cfg.task == "text" and cfg.model.vocab == 256
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    cfg = apply_overrides(cfg, ["model.loops=2", "data.val_windows=8", "method=laser", "method.rank=4"])
    assert cfg.model.loops == 2 and cfg.data.val_windows == 8 and cfg.method_options == {"rank": 4}
    with pytest.raises(ValueError, match="model.vocab"):
        apply_overrides(cfg, ["model.vocab=300"])  # derived: the task reads bytes
    with pytest.raises(ValueError, match="max_steps"):
        apply_overrides(cfg, ["max_steps=0"])
    with pytest.raises(ValueError, match="text-quick"):
        apply_overrides(train_preset("tiny"), ["task=text"])  # a maze model cannot train on text
    with pytest.raises(ValueError, match="data.max_bytes"):
        apply_overrides(cfg, ["data.max_bytes=10"])
    assert {"text-paper", "text-quick", "text-tiny"} <= set(laser.train.PRESETS)
    assert train_preset("text-paper").model.hidden == 512


def test_one_step_trains_and_resume_is_bitwise_identical(tmp_path):
    cfg = apply_overrides(train_preset("text-tiny"), [*TINY, "method=laser", "method.rank=4", "method.min_numel=16",
                                                      "checkpoint_every=2"])
    trainer = Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "whole")))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and metrics["bits_per_byte"] == pytest.approx(metrics["loss"] / math.log(2))
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.train()
    first = Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "split")))
    first.train(until=3)
    second = Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "split")), resume=True)
    assert second.step == 3
    second.train()
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    result = second.result()
    assert result["final"] == trainer.result()["final"]
    assert result["task"] == "text" and result["final"]["count"] == cfg.data.val_windows
    assert result["corpus"]["content_hash"] == text.load_split(cfg.data.max_bytes, cfg.data.val_fraction).content_hash
    assert 0 < result["trivial_bits_per_byte"] < 8


def test_evaluate_is_bits_per_byte_of_the_validation_windows():
    trainer = Trainer(apply_overrides(train_preset("text-tiny"), TINY))
    evaluation = trainer.evaluate()
    with torch.no_grad():
        logits = trainer.model(trainer.val_inputs)
        nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), trainer.val_targets.flatten())
    assert evaluation["bits_per_byte"] == pytest.approx(nats.item() / math.log(2), rel=1e-5)
    assert evaluation["count"] == len(trainer.val_inputs) == 16


def test_gradient_probe_is_exact_without_compression():
    trainer = Trainer(apply_overrides(train_preset("text-tiny"), ["grad_probe_at=1.0"]))
    trainer.train()
    assert trainer.history["grad_cosine"][-1]["model"] == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------------------- compare, analyze
def _entry(bpb: list[float], memory: float = 1.0, time: float = 1.0) -> dict:
    stat = compare_mod.summarize
    return {"metric": "bits_per_byte", "bits_per_byte": stat(bpb), "token_acc": stat([0.5] * len(bpb)),
            "activation_bytes": stat([memory]), "activation_ratio": stat([memory]), "step_time_ratio": stat([time]),
            "gradient_cosine": {"model": stat([1.0])}, "p_value": None}


def test_lower_bits_per_byte_is_better_everywhere():
    results = {"none": _entry([2.00, 2.02, 2.01]), "worse": _entry([2.50, 2.52, 2.51], memory=0.1),
               "better": _entry([1.80, 1.81, 1.79], memory=0.5, time=1.3)}
    results["worse"]["p_value"] = compare_mod.welch_p_value([2.50, 2.52, 2.51], [2.00, 2.02, 2.01])
    assert compare_mod.keeps_accuracy(results["better"], results["none"])
    assert not compare_mod.keeps_accuracy(results["worse"], results["none"])
    assert compare_mod.pareto_front(results) == ["none", "worse", "better"]
    lines = compare_mod.axis_winners(results, "none")
    lowest = next(line for line in lines if line.startswith("- lowest bits per byte: "))
    assert "**better**" in lowest and "ahead of the baseline **none**" in lowest and "bits" in lowest
    keep = next(line for line in lines if "not significantly above the baseline's" in line)
    assert "**better**" in keep
    table = "\n".join(compare_mod.accuracy_tests(results, "none"))
    assert "| worse | bits per byte | +0.5000 bits |" in table and "told apart: higher" in table
    assert BITS_PER_BYTE.higher_is_better is False and TASKS["text"].metric is BITS_PER_BYTE


def test_compare_on_text_tests_bits_per_byte(tmp_path, capsys):
    from laser.cli import main

    out = tmp_path / "cmp"
    methods = ["none", "laser:rank=4,min_numel=16"]
    code = main(["compare", "--task", "text", "--preset", "text-tiny", "--methods", ",".join(methods), "--seeds",
                 "2", "--jobs", "2", "--threads", "1", "--set", "grad_probe_at=1.0", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for label, entry in results.items():
        assert entry["metric"] == "bits_per_byte" and len(entry["bits_per_byte"]["per_seed"]) == 2, label
        assert 0 < entry["trivial_bits_per_byte"] < 8 and entry["corpus"]["content_hash"]
    lossy = results[methods[1]]
    assert results["none"]["p_value"] is None and lossy["test"].startswith("Welch t-test")
    per_seed = lossy["bits_per_byte"]["per_seed"], results["none"]["bits_per_byte"]["per_seed"]
    assert lossy["p_value"] == compare_mod.welch_p_value(*per_seed)  # the test is on bits per byte
    report = (out / "report.md").read_text()
    assert "Unigram bits per byte" in report and "val bits per byte" in report
    winners = report.split("## Who wins on which axis")[1].split("\n## ")[0].splitlines()
    assert "the baseline **none**" in next(line for line in winners if line.startswith("- lowest bits per byte: "))
    with pytest.raises(SystemExit):
        main(["compare", "--task", "text", "--preset", "tiny", "--out", str(tmp_path / "x")])
    assert "not a preset of --task text" in capsys.readouterr().err


def test_analyze_on_text(tmp_path):
    from laser.analysis.analyze import analyze

    cfg = apply_overrides(train_preset("text-tiny"), [*TINY, "method=laser", "method.rank=4", "method.min_numel=16"])
    Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "run"))).train()
    path = analyze(tmp_path / "run", out_dir=tmp_path / "analysis", max_batches=2, quick=True)
    body = path.read_text()
    assert "looped LM hidden 32" in body and "unigram frequencies" in body and "## Per-site compression" in body
    analysis = json.loads((path.parent / "analysis.json").read_text())
    assert analysis["spectra"]["main_sites"]["mlp"].startswith("blocks.0.mlp.")
    per_step = next(iter(analysis["spectra"]["rank_per_step"].values()))
    assert sorted(int(s) for s in per_step) == list(range(cfg.model.loops))  # one effective rank per loop
    points = analysis["depth"]["points"]
    assert [p["depth"] for p in points] == [2, 4, 8] and points[-1]["baseline_bytes"] > points[0]["baseline_bytes"]
