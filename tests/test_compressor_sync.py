"""Two gloo processes: the compressor's bases stay bitwise identical across ranks when sync is on."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import laser


def _worker(rank: int, world: int, store: str, out: str, settings: dict) -> None:
    """Six steps (or ``settings["steps"]``) of a small MLP applied ``settings["calls"]`` times (1: once), each rank on
    its own data; saves every site's state."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same model on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    settings = dict(settings)
    steps, calls = settings.pop("steps", 6), settings.pop("calls", 1)
    cfg = laser.LaserConfig(**{"rank": 4, "growth": 2, "max_rank": 32, "patience": 2, "min_numel": 0,
                               "policy": "paper", **settings})
    comp = laser.Compressor(model, cfg)
    data = torch.Generator().manual_seed(100 + rank)  # each rank sees its own shard
    for _ in range(steps):
        with comp:
            h = torch.randn(64, 16, generator=data)
            for _ in range(calls):
                h = model(h)
            loss = h.square().mean()
        loss.backward()
        comp.step()
    torch.save(comp.sites, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _sites(tmp_path, **settings) -> list[dict]:
    """Each rank's :attr:`laser.Compressor.sites` after :func:`_worker` with these config settings."""
    store = tmp_path / f"store-{sorted(settings.items())}"
    mp.start_processes(_worker, args=(2, str(store), str(tmp_path), settings), nprocs=2, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_bases_identical_across_ranks_only_with_sync(tmp_path):
    synced = _sites(tmp_path, sync=True)
    assert synced[0].keys() == synced[1].keys() and synced[0]
    for name, state in synced[0].items():
        assert torch.equal(state.basis, synced[1][name].basis), name
    unsynced = _sites(tmp_path, sync=False)
    assert any(not torch.equal(s.basis, unsynced[1][n].basis) for n, s in unsynced[0].items())


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_a_basis_per_position_is_identical_across_ranks(tmp_path):
    sites = _sites(tmp_path, bases="position", calls=2)
    assert sites[0].keys() == sites[1].keys()
    assert {name.rpartition("@")[2] for name in sites[0]} == {"0", "1"}
    for name, state in sites[0].items():
        assert torch.equal(state.basis, sites[1][name].basis), name


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_memory_is_made_from_the_synced_statistics_identical_across_ranks(tmp_path):
    sites = _sites(tmp_path, memory=0.75)
    carried = [name for name, state in sites[0].items() if state.memory is not None]
    assert carried  # the sites' memories were made
    for name in carried:
        assert torch.equal(sites[0][name].memory, sites[1][name].memory), name
        assert torch.equal(sites[0][name].basis, sites[1][name].basis), name


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_untracked_sites_are_retried_alike_on_every_rank(tmp_path):
    # Rank 2 of a 16-wide white-noise input never reaches the threshold: untracked after one low step.
    sites = _sites(tmp_path, rank=2, max_rank=2, patience=1, max_resets=0, retry_after=2, steps=12)
    retried = [name for name, state in sites[0].items() if state.retries]
    assert retried
    for name in retried:
        mine, theirs = sites[0][name], sites[1][name]
        assert (mine.untracked, mine.retries, mine.retry_at) == (theirs.untracked, theirs.retries, theirs.retry_at)
        assert mine.basis is theirs.basis is None or torch.equal(mine.basis, theirs.basis), name


def _uneven_worker(rank: int, world: int, store: str, out: str) -> None:
    """Rank 1 takes a data-dependent branch (an extra site) on some steps and a smaller last batch."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    extra = nn.Linear(16, 16)
    root = nn.ModuleDict({"model": model, "extra": extra})
    cfg = laser.LaserConfig(rank=4, growth=2, max_rank=32, patience=2, min_numel=0, policy="paper")
    comp = laser.Compressor(root, cfg)
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(6):
        rows = 64 if step < 5 or rank == 0 else 24
        with comp:
            h = model(torch.randn(rows, 16, generator=data))
            if rank == 1 and step % 2 == 1:
                h = torch.tanh(extra(h))
            loss = h.square().mean()
        loss.backward()
        comp.step()
    torch.save({name: state.basis for name, state in comp.sites.items()}, os.path.join(out, f"uneven{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ranks_that_see_different_sites_agree_before_any_collective(tmp_path):
    store = tmp_path / "store-uneven"
    mp.start_processes(_uneven_worker, args=(2, str(store), str(tmp_path)), nprocs=2, start_method="spawn")
    bases = [torch.load(tmp_path / f"uneven{r}.pt") for r in range(2)]
    assert bases[0].keys() == bases[1].keys()
    # the site only rank 1 produced: extra's input, the model's output (named by model.2, which returned it)
    assert "model.2/addmm:16" in bases[0]
    for name, basis in bases[0].items():
        assert (basis is None and bases[1][name] is None) or torch.equal(basis, bases[1][name]), name
