"""Activation checkpointing whose recomputed activations are stored by the method, not raw.

``torch.utils.checkpoint`` keeps a region's inputs and rebuilds its activations in backward. Those rebuilt
activations are held by the checkpoint's own saved-tensor hooks, the innermost ones, so a method's hooks
outside the region never see them: under checkpointing the peak of a step is one region's whole set of
activations however small the codes of the rest are (``benchmarks/README.md``, "The peak").

:func:`checkpoint` is the same non-reentrant checkpoint with one change: inside ``with method:`` the
recomputation's saved tensors go through the method's own pack and unpack (coded, deduplicated by storage,
version-checked, exact where they must be), so a region's rebuilt activations take what the method's codes
take. Outside ``with method:`` it is ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

How it works: the forward runs under hooks that keep, for every tensor autograd saves, only a small holder
(and the tensor's shape, dtype and device to check the rebuild against). The region's tensor inputs are saved
through the method's hooks. The first unpack of a backward reruns the region, with the forward's RNG and
autocast state, inside ``with method:`` and under hooks that pack the n-th saved tensor for the n-th holder
with the method; it stops as soon as the last holder is filled. Each holder's record is freed the moment
its node unpacks it, so the rebuilt codes go as the region's backward goes. A linear layer inside the region
takes the factored path in both runs (:mod:`laser.factored`): its backward gets the rerun's codes of its
input and makes the weight gradient from them, with no reconstruction.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.utils.checkpoint as torch_checkpoint

from laser.factored import LinearInput
from laser.hooks import ActivationMethod, CodedSaves, active_method


class _Holder:
    """What autograd keeps for one tensor saved in a checkpointed forward; its record lives in the frame.
    ``link``: the factored linear that saved it (its backward gets the rerun's codes of the tensor)."""

    __slots__ = ("link", "__weakref__")

    def __init__(self, link: LinearInput | None) -> None:
        self.link = link


class _Stop(Exception):
    """Raised inside the recomputation once every holder has its tensor (the rest of the region is skipped)."""


def _device_type(args: tuple) -> str:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    return "cpu"


def _autocast_state(device: str) -> dict:
    return {"enabled": torch.is_autocast_enabled(device), "dtype": torch.get_autocast_dtype(device),
            "cache_enabled": torch.is_autocast_cache_enabled()}


class _Frame(CodedSaves):
    """One checkpointed call: the state to rerun it, the holders of its saved tensors and, per backward, their
    records. Its hooks are the forward's."""

    def __init__(self, method: ActivationMethod, fn, args: tuple, kwargs: dict, preserve_rng_state: bool) -> None:
        self.method, self.fn, self.kwargs = method, fn, kwargs
        self.inputs = [(method._pack(a), a.requires_grad) if isinstance(a, torch.Tensor) else (a, None)
                       for a in args]
        self.device = _device_type(args)
        self.autocast = {d: _autocast_state(d) for d in {self.device, "cpu"}}
        self.preserve_rng_state = preserve_rng_state
        self.rng_devices: list[int] = []
        if preserve_rng_state:
            self.cpu_rng = torch.get_rng_state()
            module = getattr(torch, self.device, None)
            if self.device != "cpu" and getattr(module, "_initialized", False):
                self.rng_devices, self.rng_states = torch_checkpoint.get_device_states(*args)
        self.holders: list[weakref.ref] = []
        self.meta: list[tuple] = []  # (shape, dtype, device) of each saved tensor, checked at recomputation
        self.records: dict[int, weakref.WeakKeyDictionary] = {}  # graph task -> holder -> method's record

    # -------------------------------------------------------------- forward
    def pack(self, tensor: torch.Tensor) -> _Holder:
        holder = _Holder(self.method.running_link())
        self.holders.append(weakref.ref(holder))
        self.meta.append((tensor.shape, tensor.dtype, tensor.device))
        return holder

    # ------------------------------------------------------------- backward
    def unpack(self, holder: _Holder) -> torch.Tensor:
        task = torch._C._current_graph_task_id()  # -1 outside a backward: every such unpack reruns the region
        records = self.records.get(task)
        if records is None or holder not in records:
            records = self.recompute()
            if task != -1:
                self.records[task] = records
        record = records.pop(holder)
        if not records:
            self.records.pop(task, None)
        tensor = self.method._unpack(record)
        rerun = getattr(record, "link", None)
        if holder.link is not None and rerun is not None:  # the rerun's linear got codes: hand them on
            holder.link.factors = rerun.take()
        return tensor

    def recompute(self) -> weakref.WeakKeyDictionary:
        """Rerun the region; the method's record of every saved tensor whose holder is still alive."""
        rerun = _Rerun(self)
        args = [self._input(value, grad) for value, grad in self.inputs]
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self.rng_devices, enabled=self.preserve_rng_state,
                                                      device_type=self.device))
            if self.preserve_rng_state:
                torch.set_rng_state(self.cpu_rng)
                if self.rng_devices:
                    torch_checkpoint.set_device_states(self.rng_devices, self.rng_states, device_type=self.device)
            for device, state in self.autocast.items():
                if torch.amp.is_autocast_available(device):
                    stack.enter_context(torch.autocast(device, **state))
            stack.enter_context(self.method)
            stack.enter_context(self.method.recomputation())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(rerun.pack, rerun.unpack))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(contextlib.suppress(_Stop))
            self.fn(*args, **self.kwargs)
        if rerun.count < len(self.holders):
            raise RuntimeError(f"laser.checkpoint: the recomputation saved {rerun.count} tensors, the forward "
                               f"{len(self.holders)}; the checkpointed function must run the same operations "
                               "every time it is called")
        return rerun.records

    def _input(self, value: object, requires_grad: bool | None) -> object:
        """An input of the rerun: a tensor as the method gives it back, detached, with its requires_grad."""
        if requires_grad is None:
            return value
        return self.method._unpack(value).detach().requires_grad_(requires_grad)


class _Rerun(CodedSaves):
    """The hooks of one rerun of a frame: the n-th saved tensor is packed by the method for the n-th holder."""

    def __init__(self, frame: _Frame) -> None:
        self.frame, self.method, self.count = frame, frame.method, 0
        self.records: weakref.WeakKeyDictionary[_Holder, object] = weakref.WeakKeyDictionary()

    def pack(self, tensor: torch.Tensor) -> None:
        frame, index = self.frame, self.count
        shape, dtype, device = frame.meta[index]
        if (tensor.shape, tensor.dtype, tensor.device) != (shape, dtype, device):
            raise RuntimeError(
                f"laser.checkpoint: saved tensor {index} was {tuple(shape)} {dtype} on {device} in the forward "
                f"and is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device} in the recomputation; the "
                "checkpointed function must run the same operations every time it is called")
        holder = frame.holders[index]()
        self.count += 1
        if holder is not None:  # a holder already freed (its node ran) needs nothing
            self.records[holder] = self.method._pack(tensor)
        if self.count == len(frame.holders):
            raise _Stop

    def unpack(self, _: None) -> torch.Tensor:
        raise RuntimeError("laser.checkpoint: the recomputation's own graph is never run backward")


def checkpoint(fn, *args, preserve_rng_state: bool = True, **kwargs):
    """``fn(*args, **kwargs)`` with its activations recomputed in backward (non-reentrant checkpointing), the
    recomputed ones stored by the method active in this thread (see the module docstring).

    Outside ``with method:`` this is ``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
    preserve_rng_state=preserve_rng_state, **kwargs)``. Inside, ``fn`` must run the same operations every
    time it is called (the n-th tensor saved in the recomputation stands for the n-th saved in the forward,
    and a mismatch raises); tensors in ``kwargs`` are held as they are, like the arguments a closure captures.
    """
    method = active_method()
    if method is None:
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state,
                                           **kwargs)
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    frame = _Frame(method, fn, args, kwargs, preserve_rng_state)
    with torch.autograd.graph.saved_tensors_hooks(frame.pack, frame.unpack):
        return fn(*args, **kwargs)
