"""Test-session settings shared by every test file."""

import pytest
import torch

# One intra-op thread: the suite's tensors are small, and on a busy 2-core machine OpenMP's spin-waiting
# made small kernels up to 100x slower with two threads.
torch.set_num_threads(1)


@pytest.fixture
def ranks_results(tmp_path):
    """Run ``worker(rank, 2, store, out)`` on 2 spawned processes; the ``out/ddp{rank}.pt`` each saved, by rank."""
    import torch.multiprocessing as mp

    def run(worker) -> list:
        mp.start_processes(worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
        return [torch.load(tmp_path / f"ddp{rank}.pt") for rank in range(2)]

    return run
