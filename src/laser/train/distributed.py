"""Data-parallel training on PyTorch's distributed engine: process group, batch slices, metrics, checkpoints.

One process per device, started by ``torchrun``, which sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``:

    torchrun --nproc_per_node 2 -m laser.cli train --preset tiny --method laser --out runs/ddp

Every optimizer step trains on the same global batch as a one-process run: rank ``r`` of ``R`` takes rows
``[r * B/R, (r+1) * B/R)`` of it, gradients are averaged across ranks (DDP all-reduce, or FSDP2
reduce-scatter), and the LASER compressor all-reduces its statistics (``LaserConfig.sync``), so every rank
holds the same bases. Checkpoints hold full (unsharded) states and the global carry, written once by
rank 0, so a run resumes with any number of processes.

:class:`Parallel` is this process's part in the run. With one process (no ``torchrun``) every operation is
the identity, so the training loop has no branch for it:

>>> parallel = Parallel.setup("ddp", torch.device("cpu"))     # doctest: +SKIP
>>> step = parallel.prepare(model)                  # model.forward_carry, wrapped for DDP or FSDP
>>> inputs = parallel.shard(global_inputs)          # this rank's slice of the global batch
>>> metrics = parallel.reduce(metrics, mean=("loss",), maximum=("step_seconds",))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("ddp", "fsdp")
# torchrun's description of this process; absent outside torchrun.
ENV_RANK, ENV_WORLD, ENV_LOCAL_RANK = "RANK", "WORLD_SIZE", "LOCAL_RANK"


# ------------------------------------------------------------------------------------ process group
def env_world() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` as torchrun set them; ``(0, 1, 0)`` outside torchrun."""
    try:
        rank = int(os.environ.get(ENV_RANK, "0"))
        world = int(os.environ.get(ENV_WORLD, "1"))
        local = int(os.environ.get(ENV_LOCAL_RANK, str(rank)))
    except ValueError as err:
        raise ValueError(f"torchrun environment is invalid ({err}): {ENV_RANK}, {ENV_WORLD} and "
                         f"{ENV_LOCAL_RANK} must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"torchrun environment is invalid: {ENV_RANK}={rank} must be in [0, {ENV_WORLD}={world})")
    return rank, world, local


def backend_for(device: torch.device) -> str:
    """The collective backend of ``device``: NCCL on CUDA, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def process_device(device: torch.device, local_rank: int, world: int) -> torch.device:
    """The device of this process: under torchrun each process on a node takes the GPU ``cuda:LOCAL_RANK``.

    An explicit ``cuda:N`` other than the local rank's GPU would put two processes on one GPU and fails.
    """
    if device.type != "cuda" or world == 1:
        return device
    if device.index is not None and device.index != local_rank:
        raise ValueError(f"device={device} is invalid under torchrun: each process uses cuda:LOCAL_RANK "
                         f"(here cuda:{local_rank}); use device=cuda or device=auto")
    return torch.device("cuda", local_rank)


def teardown() -> None:
    """Leave the process group, if one was joined (call once at the end of the program)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------- pure helpers
def check_batch(batch: int, world: int) -> None:
    """Fail unless the global batch splits into ``world`` equal slices."""
    if batch % world:
        lower, upper = batch // world * world, -(-batch // world) * world
        choices = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"batch={batch} is invalid with world size {world}: the global batch must divide by "
                         f"the number of processes so every rank takes an equal slice; use e.g. batch={choices}")


def shard(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of ``tensor`` along dim 0 (the global batch), a view."""
    check_batch(tensor.shape[0], world)
    size = tensor.shape[0] // world
    return tensor[rank * size : (rank + 1) * size]


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards on their own: every member of an ``nn.ModuleList`` (the transformer blocks)."""
    return [unit for module in model.modules() if isinstance(module, nn.ModuleList) for unit in module]


class MethodAsForward(nn.Module):
    """Runs ``model.<method>`` as ``forward``, so that DDP sees the call.

    DDP prepares its gradient all-reduce in its own ``forward``; calling another method of the wrapped model
    (``forward_carry``) directly would skip that and silently leave gradients unreduced.
    """

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args: object, **kwargs: object) -> object:
        """``model.<method>(*args, **kwargs)``."""
        return getattr(self.model, self.method)(*args, **kwargs)


# -------------------------------------------------------------------------------------------- parallel
@dataclass
class Parallel:
    """This process's part in a data-parallel run: rank, world size, device and how the model is wrapped.

    Attributes:
        mode: ``"ddp"`` (replicated weights, all-reduced gradients) or ``"fsdp"`` (FSDP2 ``fully_shard``:
            weights, gradients and optimizer state sharded across ranks, parameters all-gathered per unit).
        rank, world: this process's rank and the number of processes.
        device: this process's device.
    """

    mode: str
    rank: int
    world: int
    device: torch.device

    def __post_init__(self) -> None:
        if self.mode not in PARALLEL_MODES:
            raise ValueError(f"parallel={self.mode!r} is invalid: use one of {', '.join(PARALLEL_MODES)}")

    @classmethod
    def setup(cls, mode: str, device: torch.device) -> Parallel:
        """Join the process group torchrun described (gloo on the CPU, NCCL on CUDA), once per process.

        Without torchrun (``WORLD_SIZE`` unset or 1) nothing is initialised: a one-process run. A process
        group initialised already (a test's ``file://`` store) is used as it is.
        """
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
            local = int(os.environ.get(ENV_LOCAL_RANK, str(rank)))
            return cls(mode, rank, world, process_device(device, local, world))
        rank, world, local = env_world()
        if world == 1:
            return cls(mode, 0, 1, device)
        if not dist.is_available():
            raise RuntimeError(f"{ENV_WORLD}={world} but this PyTorch build has no torch.distributed")
        device = process_device(device, local, world)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each process to its own GPU
        dist.init_process_group(backend_for(device), rank=rank, world_size=world)
        return cls(mode, rank, world, device)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether weights and optimizer state are sharded across ranks (FSDP with more than one process)."""
        return self.mode == "fsdp" and self.world > 1

    # ------------------------------------------------------------------------------------------- data
    def check_batch(self, batch: int) -> None:
        """Fail unless the global batch splits into equal slices across ranks."""
        check_batch(batch, self.world)

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (dim 0), a copy: what autograd saves of it then
        holds this rank's rows only, not the whole batch's storage."""
        return shard(tensor, self.rank, self.world).clone() if self.world > 1 else tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The global batch from every rank's equal slice (dim 0), in rank order; the inverse of :meth:`shard`."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def reduce(self, metrics: dict, mean: Iterable[str] = (), maximum: Iterable[str] = ()) -> dict:
        """``metrics`` with the ``mean`` keys averaged and the ``maximum`` keys maximised over ranks.

        Averaging is exact for per-rank means over equal slices (loss, accuracy); a time is the slowest rank's.
        Other keys are this rank's values (the same on every rank: gradient norm, learning rate).
        """
        if self.world == 1:
            return dict(metrics)
        out = dict(metrics)
        for keys, op in ((list(mean), dist.ReduceOp.SUM), (list(maximum), dist.ReduceOp.MAX)):
            if not keys:
                continue
            values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(values, op=op)
            if op == dist.ReduceOp.SUM:
                values /= self.world
            out |= dict(zip(keys, values.tolist(), strict=True))
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------------------------------ model
    def prepare(self, model: nn.Module, forward: str = "forward_carry") -> Callable:
        """Wrap ``model`` for the run and return the callable that runs ``model.<forward>`` in training.

        DDP: the model stays as it is (its state dict, sites and hooks too) and the callable is
        ``DDP(MethodAsForward(model, forward))``. FSDP: every :func:`fsdp_units` module and then the model
        are ``fully_shard``-ed in place (their parameters become sharded DTensors; build the optimizer
        after this), and ``forward`` is registered so that calling it all-gathers the parameters.
        One process: ``model.<forward>`` itself.
        """
        if self.world == 1:
            return getattr(model, forward)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers are constants set at init (synced then): no broadcast before each forward.
            return DistributedDataParallel(MethodAsForward(model, forward), device_ids=device_ids,
                                           forward_sync_buffers=False)
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for unit in fsdp_units(model):
            fully_shard(unit)
        fully_shard(model)
        if forward != "__call__":  # a plain call runs FSDP's forward hooks already
            register_fsdp_forward_method(model, forward)
        return getattr(model, forward)

    def model_state(self, model: nn.Module) -> dict:
        """The model's full state dict; with FSDP gathered on rank 0 (the others get ``{}``). Collective."""
        if not self.sharded:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, model: nn.Module, state: dict) -> None:
        """Load a full state dict (every rank passes the whole of it); FSDP keeps each rank's shard."""
        if not self.sharded:
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's full state dict in the one-process format (parameters numbered in order).

        With FSDP it is gathered on rank 0 (the others get ``{}``); collective.
        """
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not full:
            return {}
        index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
        return {
            "state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": [group | {"params": [index[name] for name in group["params"]]}
                             for group in full["param_groups"]],
        }

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a full optimizer state dict in the one-process format (every rank passes the whole of it)."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = _parameter_names(model, optimizer)
        by_name = {
            "state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [group | {"params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in the order ``optimizer.state_dict()`` numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
