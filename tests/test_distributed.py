"""Multi-process training on gloo: two spawned ranks against one process over the same global batches.

One module fixture spawns two ranks once (a ``file://`` store in tmp_path) and runs every two-process
scenario in them: DDP with ``none`` and ``laser`` (and ``laser`` without sync), resuming a one-process
checkpoint, stopping after a checkpoint, and FSDP2 (``fully_shard``) with the compressor. The tests
compare what the ranks saved with one-process runs made here.
"""

import dataclasses
import datetime
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import laser
from laser.models.trm import TRM
from laser.train import CheckpointError, Trainer, apply_overrides, load_checkpoint, train_preset
from laser.train.distributed import (
    MethodAsForward,
    Parallel,
    backend_for,
    check_batch,
    env_world,
    fsdp_units,
    process_device,
    shard,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

WORLD = 2
FAST = settings(max_examples=25, deadline=None)
# Every step a power-iteration step (fidelity never under the threshold), every row of the first step kept
# for the initial SVD, and no tensor whose admission or break-even depends on the per-rank batch (the
# (B, L) loss tensors): the bases then depend only on sums over the global batch, so one and two processes
# differ by float summation order only.
LASER = ["method=laser", "method.rank=4", "method.min_numel=256", "method.threshold=0.1", "method.reset_rows=4096"]
STOP = 3  # mid-batch (n_sup=2): the resumed run needs the saved carry
# PATH cells weigh 3: each rank's slice holds a different share of them, so a per-rank weighted mean would
# not average to the global one (the trainer normalises by the global weight instead).
NONE = ["model.path_weight=3.0"]


def config(out, *overrides):
    """The tiny preset for 6 steps, a metrics line per step, the final evaluation only."""
    base = ["max_steps=6", "eval_every=0", "log_every=1", "grad_probe_at=()", "device=cpu", f"out_dir={out}"]
    return apply_overrides(train_preset("tiny"), [*base, *overrides])


def snapshot(trainer: Trainer, result: dict) -> dict:
    """What a test compares: weights (full on rank 0), per-step losses, bases and activation bytes of the last
    report. Collective under FSDP."""
    sites = getattr(trainer.method, "sites", {})
    return {
        "params": {k: v.detach().clone() for k, v in trainer.parallel.model_state(trainer.model).items()},
        "losses": [row["loss"] for row in result["curves"]["train"]],
        "bases": {name: state.basis.clone() for name, state in sites.items() if state.basis is not None},
        "stored": result["activation_bytes"],
        "raw": result["raw_activation_bytes"],
    }


# ------------------------------------------------------------------------------------- the two ranks
def _fsdp_sites(root: str, rank: int) -> None:
    """A compressor on an FSDP2-sharded TRM: record whether any encoded storage is a gathered parameter."""
    cfg = config(root)
    torch.manual_seed(0)
    model = TRM(cfg.model)
    step = Parallel("fsdp", rank, WORLD, torch.device("cpu")).prepare(model)
    comp = laser.Compressor(model, laser.LaserConfig(rank=4, min_numel=16))
    hits, encoded = [], []
    encode = comp.encode

    def spy(x: torch.Tensor, site: str):
        # During the forward FSDP2 swaps each running unit's sharded DTensors for gathered plain Parameters.
        gathered = {p.untyped_storage().data_ptr() for p in model.parameters() if type(p) is torch.nn.Parameter}
        encoded.append(site)
        if x.untyped_storage().data_ptr() in gathered:
            hits.append(site)
        return encode(x, site)

    comp.encode = spy
    inputs = torch.randint(0, 5, (4, cfg.model.seq_len), generator=torch.Generator().manual_seed(rank))
    for _ in range(3):
        with comp:
            _, logits, _ = step(inputs, None)
            loss = logits.square().mean()
        loss.backward()
        comp.step()
    report = comp.report()
    sharded = sum(1 for p in model.parameters() if type(p) is not torch.nn.Parameter)
    torch.save({"hits": hits, "encoded": encoded, "stored": report.stored_bytes, "raw": report.raw_bytes,
                "sharded": sharded}, os.path.join(root, f"fsdp-sites-rank{rank}.pt"))


def _fsdp_runs(root: str, rank: int) -> None:
    trainer = Trainer(config(os.path.join(root, "fsdp"), *LASER, "parallel=fsdp"))
    torch.save(snapshot(trainer, trainer.train()), os.path.join(root, f"fsdp-rank{rank}.pt"))
    Trainer(config(os.path.join(root, "to1-fsdp"), *LASER, "parallel=fsdp")).train(until=STOP)
    _fsdp_sites(root, rank)


def _ranks(rank: int, store: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name, overrides in {"none": NONE, "laser": LASER, "laser-nosync": [*LASER, "method.sync=false"]}.items():
            trainer = Trainer(config(os.path.join(root, name), *overrides))
            torch.save(snapshot(trainer, trainer.train()), os.path.join(root, f"{name}-rank{rank}.pt"))
        # A one-process checkpoint at step STOP, finished by two processes.
        trainer = Trainer(config(os.path.join(root, "from1"), *LASER), resume=True)
        resumed_at = trainer.step
        torch.save(snapshot(trainer, trainer.train()) | {"resumed_at": resumed_at},
                   os.path.join(root, f"from1-rank{rank}.pt"))
        # Two processes stopped right after a checkpoint (as if killed there); one process finishes it.
        Trainer(config(os.path.join(root, "to1"), *LASER)).train(until=STOP)
        try:  # last, and kept apart: a failure here is reported by the FSDP tests
            _fsdp_runs(root, rank)
        except Exception:
            with open(os.path.join(root, f"fsdp-error-rank{rank}.txt"), "w") as f:
                f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    Trainer(config(root / "from1", *LASER)).train(until=STOP)
    mp.start_processes(_ranks, args=(str(root / "store"), str(root)), nprocs=WORLD, start_method="spawn")
    return root


def ranks(root, name: str) -> list[dict]:
    return [torch.load(root / f"{name}-rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(runs):
    """One-process runs of ``none`` and ``laser`` over the same global batches as the ranks."""
    out = {}
    for name, overrides in {"none": NONE, "laser": LASER}.items():
        trainer = Trainer(config(runs / f"{name}-single", *overrides))
        out[name] = snapshot(trainer, trainer.train())
    return out


def fsdp_ok(root) -> None:
    errors = [root / f"fsdp-error-rank{r}.txt" for r in range(WORLD)]
    if any(path.exists() for path in errors):
        pytest.fail("FSDP ranks failed:\n" + "\n".join(p.read_text() for p in errors if p.exists()))


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


# ------------------------------------------------------------------------------------------- tests
def test_bases_identical_across_ranks_through_the_trainer(runs):
    synced = ranks(runs, "laser")
    assert synced[0]["bases"] and synced[0]["bases"].keys() == synced[1]["bases"].keys()
    for name, basis in synced[0]["bases"].items():
        assert torch.equal(basis, synced[1]["bases"][name]), name
    assert synced[0]["stored"] < synced[0]["raw"]  # the sites were compressed, not stored raw
    # Without sync each rank tracks its own slice of the batch: the bases drift apart.
    unsynced = ranks(runs, "laser-nosync")
    assert any(not torch.equal(b, unsynced[1]["bases"][n]) for n, b in unsynced[0]["bases"].items())


def test_two_processes_train_like_one_over_the_same_global_batch(runs, single):
    single, both = single["none"], ranks(runs, "none")
    assert torch.equal(both[0]["params"]["head.weight"], both[1]["params"]["head.weight"])
    assert_same_weights(both[0]["params"], single["params"])
    # Logged losses are reduced over ranks: each rank's own loss is over half the batch only.
    torch.testing.assert_close(both[0]["losses"], single["losses"], atol=1e-5, rtol=1e-5)
    # The activations of each rank are half the batch's.
    assert both[0]["raw"] * WORLD == pytest.approx(single["raw"], rel=0.01)


def test_rank_zero_writes_metrics_and_checkpoint_once(runs):
    lines = [json.loads(line) for line in (runs / "none" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == list(range(1, 7))
    assert sorted(p.name for p in (runs / "none").iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    state = load_checkpoint(runs / "none" / "checkpoint.pt")
    assert state["step"] == 6 and state["data"] == {"epoch": 0, "index": 3, "sup": 0}


def test_one_process_checkpoint_resumes_in_two(runs, single):
    """LASER on two processes continues exactly like one: the bases of step STOP on are all-reduced sums over
    the global batch. (From scratch the runs differ by design: a site's first step codes each tensor against
    its own top-k basis, and a rank's tensors hold half the rows.)"""
    assert single["laser"]["stored"] < single["laser"]["raw"]  # LASER really compressed
    both = ranks(runs, "from1")
    assert both[0]["resumed_at"] == STOP
    assert_same_weights(both[0]["params"], single["laser"]["params"])
    torch.testing.assert_close(both[0]["losses"], single["laser"]["losses"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["to1", "to1-fsdp"])
def test_two_process_checkpoint_resumes_in_one(runs, name):
    if "fsdp" in name:
        fsdp_ok(runs)
    path = runs / name / "checkpoint.pt"
    state = load_checkpoint(path)  # the file a rank killed after this step leaves behind
    assert state["step"] == STOP and state["data"]["sup"] == 1
    batch, seq = train_preset("tiny").batch, train_preset("tiny").data.size ** 2
    assert state["carry"]["y"].shape[:2] == (batch, seq)  # the global carry, not one rank's slice
    trainer = Trainer(config(runs / name, *LASER, *(["parallel=fsdp"] if "fsdp" in name else [])), resume=True)
    assert trainer.step == STOP
    resumed = snapshot(trainer, trainer.train())
    # The same weights as two processes that were never stopped.
    assert_same_weights(resumed["params"], ranks(runs, "laser")[0]["params"])
    torch.testing.assert_close(resumed["losses"], ranks(runs, "laser")[0]["losses"], atol=1e-5, rtol=1e-5)


def test_fsdp_trains_like_ddp(runs):
    fsdp_ok(runs)
    both, ddp = ranks(runs, "fsdp"), ranks(runs, "laser")[0]
    assert both[1]["params"] == {}  # the full weights are gathered on rank 0 only
    for name, basis in both[0]["bases"].items():
        assert torch.equal(basis, both[1]["bases"][name]), name
    assert_same_weights(both[0]["params"], ddp["params"])
    torch.testing.assert_close(both[0]["losses"], ddp["losses"], atol=1e-5, rtol=1e-5)


def test_fsdp_gathered_parameters_never_become_sites(runs):
    fsdp_ok(runs)
    for r in range(WORLD):
        seen = torch.load(runs / f"fsdp-sites-rank{r}.pt")
        assert seen["sharded"] > 0  # the parameters really were sharded DTensors
        assert seen["encoded"] and seen["hits"] == []
        assert seen["stored"] < seen["raw"]


def test_a_write_cut_short_leaves_the_last_checkpoint(runs, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes((runs / "to1" / "checkpoint.pt").read_bytes())

    def dies_midway(state, f):
        f.write(b"half a checkpoint")
        raise SystemExit("killed")

    monkeypatch.setattr(torch, "save", dies_midway)
    trainer = Trainer(config(tmp_path, *LASER), resume=True)
    with pytest.raises(SystemExit):
        trainer.save()
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(path)["step"] == trainer.step  # the previous checkpoint, whole


def test_truncated_distributed_checkpoint_fails_clearly(runs, tmp_path):
    data = (runs / "to1" / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Trainer(config(tmp_path, *LASER), resume=True)


# -------------------------------------------------------------------------------- one-process helpers
@FAST
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3))
def test_shards_tile_the_global_batch_in_rank_order(world, per_rank, width):
    batch = torch.arange(world * per_rank * width).reshape(world * per_rank, width)
    parts = [shard(batch, r, world) for r in range(world)]
    assert all(p.shape == (per_rank, width) for p in parts)
    assert torch.equal(torch.cat(parts), batch)


@pytest.mark.parametrize(("batch", "world"), [(10, 4), (3, 2), (1, 2)])
def test_indivisible_batch_fails_naming_batch_and_world(batch, world):
    with pytest.raises(ValueError, match=rf"batch={batch} .*world size {world}"):
        check_batch(batch, world)
    with pytest.raises(ValueError, match="batch="):
        Parallel("ddp", 0, world, torch.device("cpu")).check_batch(batch)
    check_batch(batch * world, world)


def test_one_process_parallel_is_the_identity():
    parallel = Parallel.setup("fsdp", torch.device("cpu"))
    assert (parallel.rank, parallel.world, parallel.is_main, parallel.sharded) == (0, 1, True, False)
    x = torch.randn(6, 3)
    assert parallel.shard(x) is x and parallel.gather(x) is x
    assert parallel.reduce({"loss": 2.0, "lr": 1.0}, mean=("loss",), maximum=("lr",)) == {"loss": 2.0, "lr": 1.0}
    model = TRM(train_preset("tiny").model)
    assert parallel.prepare(model) == model.forward_carry


def test_environment_and_modes(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert env_world() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4"):
        env_world()
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        process_device(torch.device("cuda:0"), local_rank=1, world=2)
    assert process_device(torch.device("cuda"), local_rank=1, world=2) == torch.device("cuda:1")
    assert process_device(torch.device("cpu"), local_rank=1, world=2) == torch.device("cpu")
    assert (backend_for(torch.device("cpu")), backend_for(torch.device("cuda:1"))) == ("gloo", "nccl")
    with pytest.raises(ValueError, match="parallel='zero'"):
        Parallel("zero", 0, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="parallel"):
        apply_overrides(train_preset("tiny"), ["parallel=zero"])


def test_fsdp_units_are_the_blocks_and_ddp_sees_forward_carry():
    model = TRM(dataclasses.replace(train_preset("tiny").model, L_layers=2))
    assert fsdp_units(model) == list(model.blocks)
    wrapper = MethodAsForward(model, "forward_carry")
    inputs = torch.randint(0, 5, (2, model.cfg.seq_len))
    torch.testing.assert_close(wrapper(inputs)[1], model.forward_carry(inputs)[1])
    assert {id(p) for p in wrapper.parameters()} == {id(p) for p in model.parameters()}
