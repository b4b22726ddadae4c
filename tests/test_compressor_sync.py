"""Two gloo processes: the compressor's bases stay bitwise identical across ranks when sync is on."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import laser


def _worker(rank: int, world: int, store: str, out: str, sync: bool, memory: float = 0.0) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same model on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    cfg = laser.LaserConfig(rank=4, growth=2, max_rank=32, patience=2, min_numel=0, policy="paper", sync=sync,
                            memory=memory)
    comp = laser.Compressor(model, cfg)
    data = torch.Generator().manual_seed(100 + rank)  # each rank sees its own shard
    for _ in range(6):
        with comp:
            loss = model(torch.randn(64, 16, generator=data)).square().mean()
        loss.backward()
        comp.step()
    torch.save({name: state.basis for name, state in comp.sites.items()}, os.path.join(out, f"rank{rank}.pt"))
    torch.save({name: state.memory for name, state in comp.sites.items()}, os.path.join(out, f"memory{rank}.pt"))
    dist.destroy_process_group()


def _bases(tmp_path, sync: bool, memory: float = 0.0) -> list[dict[str, torch.Tensor]]:
    store = tmp_path / f"store-{sync}-{memory}"
    mp.start_processes(_worker, args=(2, str(store), str(tmp_path), sync, memory), nprocs=2, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_bases_identical_across_ranks_only_with_sync(tmp_path):
    synced = _bases(tmp_path, sync=True)
    assert synced[0].keys() == synced[1].keys() and synced[0]
    for name, basis in synced[0].items():
        assert torch.equal(basis, synced[1][name]), name
    unsynced = _bases(tmp_path, sync=False)
    assert any(not torch.equal(b, unsynced[1][n]) for n, b in unsynced[0].items())


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_memory_is_made_from_the_synced_statistics_identical_across_ranks(tmp_path):
    bases = _bases(tmp_path, sync=True, memory=0.75)
    memories = [torch.load(tmp_path / f"memory{r}.pt") for r in range(2)]
    carried = [name for name, m in memories[0].items() if m is not None]
    assert carried  # the sites' memories were made
    for name in carried:
        assert torch.equal(memories[0][name], memories[1][name]), name
        assert torch.equal(bases[0][name], bases[1][name]), name


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
