"""Saved-tensor plumbing shared by every activation-memory method.

One :class:`ActivationMethod` sits between autograd and the tensors it saves for backward:

* **sites**: forward hooks on every submodule track which module is running, so a saved tensor is named
  ``"<module path>:<width>"``. A weight-tied block run at 24 recursion steps is one site.
* **parameters are never touched**: autograd also saves parameters and buffers (often as views such as
  ``weight.t()``); they are recognised by storage and passed through untouched, as are non-float tensors.
* **storage, not view**: autograd saves several views of one storage (q, k and v of one ``qkv`` output;
  a linear's input as a reshaped view). The base storage is encoded once and every view is rebuilt from
  it with ``as_strided``. Storages are keyed by address *and* a weak reference, because the allocator
  hands a freed storage's address to the next tensor of the same forward.
* **accounting**: raw and stored bytes are counted once per unique storage, per site and step.

A method subclasses :class:`ActivationMethod` and implements :meth:`ActivationMethod.encode` (and, if it
keeps state, :meth:`~ActivationMethod.update`, :meth:`~ActivationMethod.site_row` and the state hooks).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from itertools import chain

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from laser.config import OUTSIDE, SiteFilter

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    DTensor = None
from laser.report import Report, SiteReport


class SiteNamer:
    """Knows which module is running, through forward pre- and post-hooks on every submodule.

    The stack is thread-local: autograd may run checkpoint recomputation on another thread.
    """

    def __init__(self, model: nn.Module) -> None:
        self._local = threading.local()
        self._handles = []
        for name, module in model.named_modules():
            label = name or type(module).__name__
            self._handles.append(module.register_forward_pre_hook(_Push(self._local, label)))
            self._handles.append(module.register_forward_hook(_Pop(self._local), always_call=True))

    def current(self) -> str:
        """Path of the innermost module running now (``OUTSIDE`` when no module runs)."""
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else OUTSIDE

    def remove(self) -> None:
        """Detach every hook this namer added."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _Hook:
    """Module hooks are shared, not copied, by ``copy.deepcopy(model)``: a copy keeps naming sites."""

    def __deepcopy__(self, memo: dict) -> _Hook:
        return self


class _Push(_Hook):
    def __init__(self, local: threading.local, label: str) -> None:
        self.local, self.label = local, label

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        self.local.stack.append(self.label)


class _Pop(_Hook):
    def __init__(self, local: threading.local) -> None:
        self.local = local

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        stack = getattr(self.local, "stack", None)
        if stack:
            stack.pop()


class Packed:
    """A storage kept in encoded form; :meth:`decode` rebuilds its whole flat content.

    Attributes:
        nbytes: bytes this record alone keeps alive (codes, scales).
        shared: tensors several records may share (a site's basis), counted once per step.
    """

    def __init__(self, nbytes: int, shared: tuple[torch.Tensor, ...] = ()) -> None:
        self.nbytes = nbytes
        self.shared = shared
        self.views = 0  # saved views handed to autograd
        self._decoded: weakref.ref | None = None
        self._held: torch.Tensor | None = None
        self._unpacks_left = 0

    def decode(self) -> torch.Tensor:
        """The storage's content as a flat tensor in its original dtype."""
        raise NotImplementedError

    def decoded(self) -> torch.Tensor:
        """:meth:`decode` once per backward for all of the storage's views.

        Two backward nodes that saved views of one storage (an RMS norm's input and output, the halves of a
        gate/up projection) run apart, so a weak cache alone would decode twice. The result is held until
        every view was unpacked once, then only weakly (a second backward with ``retain_graph`` decodes anew).
        """
        flat = self._decoded() if self._decoded is not None else None
        if flat is None:
            flat = self.decode()
            self._decoded = weakref.ref(flat)
            self._held, self._unpacks_left = flat, self.views
        self._unpacks_left -= 1
        if self._unpacks_left <= 0:
            self._held = None
        return flat


class _View:
    """What autograd holds for one saved view of an encoded storage."""

    __slots__ = ("record", "size", "stride", "offset")

    def __init__(self, record: Packed, tensor: torch.Tensor) -> None:
        self.record = record
        self.size, self.stride, self.offset = tensor.size(), tensor.stride(), tensor.storage_offset()


@dataclass
class _Entry:
    ref: StorageWeakRef
    version: int
    record: Packed | None


@dataclass
class SiteAccount:
    """Bytes and counts of one site during the current step."""

    dim: int
    raw_bytes: int = 0
    stored_bytes: int = 0
    tensors: int = 0
    fallbacks: int = 0
    shared: dict[int, torch.Tensor] = field(default_factory=dict)


def row_width(base: torch.Tensor, fold_to: int = 0) -> int:
    """Width of the rows a storage is coded in: ``base``'s last dimension, folded up to ``fold_to``.

    The dimensions of ``base`` are taken in memory order (innermost first) and merged into the row while
    each continues the dense block before it (stride == the block's size) and the merged width stays
    <= ``fold_to``. The layout is what counts, not the dimension order: attention heads (B, H, L, hd) with
    the strides of a (B, L, H, hd) tensor fold into rows of H*hd per token when ``fold_to`` >= H*hd, while
    a heads-major (B, H, L, hd) tensor would need L*hd and is left alone for a ``fold_to`` of the model
    width. Size-1 dimensions are skipped; a last dimension that is not innermost is never folded.
    """
    if base.dim() == 0:
        return 1
    width = base.shape[-1]
    if width >= fold_to or base.stride(-1) != 1:  # no dimension could merge; skips the sort on the hot path
        return width
    dims = sorted((d for d in range(base.dim() - 1) if base.shape[d] > 1), key=base.stride)
    for d in dims:
        if base.stride(d) != width or width * base.shape[d] > fold_to:
            break
        width *= base.shape[d]
    return width


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's own elements."""
    return t.numel() * t.element_size()


class ActivationMethod(torch.autograd.graph.saved_tensors_hooks):
    """Base class of every activation-memory method: hooks, sites, dedupe and byte accounting.

    The hooks are active only inside ``with method:``; nesting the same method is allowed and
    installs the hooks once. Module hooks that name sites stay until :meth:`remove`.

    >>> method = ActivationMethod(model, NoneConfig())      # doctest: +SKIP
    >>> with method:
    ...     loss = model(x).square().mean()
    >>> loss.backward(); method.step()
    >>> print(method.report())
    """

    name = "none"

    def __init__(self, model: nn.Module, config: SiteFilter) -> None:
        """Attach site-naming hooks to ``model``; saved-tensor hooks wait for ``with``.

        ``seconds`` accumulates wall time spent encoding (pack), decoding (unpack) and updating (step),
        for reporting compression time as a share of the step (on a GPU it measures launch time only).
        """
        super().__init__(self._pack, self._unpack)
        self.model = model
        self.config = config
        self.generator = torch.Generator().manual_seed(getattr(config, "seed", 0))
        self.steps = 0
        self._namer = SiteNamer(model)
        self._depth = 0
        self._live: dict[tuple, _Entry] = {}
        self._frozen_storages: set[tuple] = set()
        self._accounts: dict[str, SiteAccount] = {}
        self._last: Report | None = None
        self._removed = False
        self.seconds = {"encode": 0.0, "decode": 0.0, "update": 0.0}

    # ----------------------------------------------------------------- context
    def __enter__(self) -> ActivationMethod:
        if self._removed:
            raise RuntimeError(f"{type(self).__name__} was removed; build a new one to use it again")
        if self._depth == 0:
            tensors = chain(self.model.parameters(), self.model.buffers())
            self._frozen_storages = {_storage_key(t) for t in tensors}
            super().__enter__()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            super().__exit__(*exc)
            self._live.clear()

    # ------------------------------------------------------------------- hooks
    def _pack(self, tensor: torch.Tensor) -> object:
        if _is_parameter(tensor) or _storage_key(tensor) in self._frozen_storages:
            return tensor
        storage = tensor.untyped_storage()
        key = _storage_key(tensor)
        entry = self._live.get(key)
        if entry is None or entry.ref.expired() or entry.version != tensor._version:
            start = time.perf_counter()
            entry = _Entry(StorageWeakRef(storage), tensor._version, self._encode_storage(tensor))
            self._live[key] = entry
            self.seconds["encode"] += time.perf_counter() - start
        if entry.record is None:
            return tensor
        entry.record.views += 1
        return _View(entry.record, tensor)

    def _unpack(self, packed: object) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        start = time.perf_counter()
        flat = packed.record.decoded()
        self.seconds["decode"] += time.perf_counter() - start
        return flat.as_strided(packed.size, packed.stride, packed.offset)

    def _encode_storage(self, tensor: torch.Tensor) -> Packed | None:
        """Account a newly seen storage and encode it when admitted; ``None`` keeps it raw."""
        base = tensor._base if tensor._base is not None else tensor
        dim = row_width(base, self.config.fold_to)
        site = f"{self._namer.current()}:{dim}"
        storage_bytes = tensor.untyped_storage().nbytes()
        account = self._accounts.get(site)
        if account is None:
            account = self._accounts[site] = SiteAccount(dim)
        account.raw_bytes += storage_bytes
        account.tensors += 1
        record = None
        numel = storage_bytes // tensor.element_size()
        if (
            tensor.is_floating_point()
            and base.dim() >= 1
            and dim > 0
            and base.stride(-1) == 1
            and storage_bytes % (tensor.element_size() * dim) == 0
            and self.config.admits(site, dim, numel)
        ):
            flat = tensor.detach().as_strided((numel // dim, dim), (dim, 1), 0)  # (N, D) over the storage
            with torch.no_grad(), autocast_off(flat.device):
                record = self.encode(flat, site)
            if record is None:
                account.fallbacks += 1
        if record is None:
            account.stored_bytes += storage_bytes
        else:
            account.stored_bytes += record.nbytes
            for shared in record.shared:
                if id(shared) not in account.shared:
                    account.shared[id(shared)] = shared
                    account.stored_bytes += tensor_bytes(shared)
        return record

    # ------------------------------------------------------- for subclasses
    def encode(self, x: torch.Tensor, site: str) -> Packed | None:
        """Encode one admitted storage viewed as ``x`` (N, D); ``None`` keeps it raw (a fallback).

        Runs without grad and without autocast. The base method keeps everything raw.
        """
        return None

    def update(self) -> None:
        """Update method state between steps (basis tracking); the base method has none."""

    def site_row(self, site: str, account: SiteAccount) -> SiteReport:
        """The report row of one site for the current step."""
        return SiteReport(site, account.dim, account.dim, 1.0, account.raw_bytes, account.stored_bytes,
                          account.tensors, fallbacks=account.fallbacks)

    def extra_state(self) -> dict:
        """Method state beyond the common fields, for :meth:`state_dict`."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` returned."""

    # ------------------------------------------------------------------ public
    def step(self) -> None:
        """Close the training step: update the method's state, then freeze the step's report.

        Call once per optimizer step, after ``backward()``. With nothing recorded it only counts the step.
        """
        start = time.perf_counter()
        self.update()
        self.seconds["update"] += time.perf_counter() - start
        self._last = self._build_report()
        self._accounts = {}
        self.steps += 1

    def report(self) -> Report:
        """The current step's report if anything was saved since the last :meth:`step`, else the last."""
        if self._accounts or self._last is None:
            return self._build_report()
        return self._last

    def _build_report(self) -> Report:
        rows = [self.site_row(site, account) for site, account in sorted(self._accounts.items())]
        return Report(rows, method=self.name, step=self.steps)

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: config, step count, generator and method state."""
        return {
            "method": self.name,
            "config": asdict(self.config),
            "steps": self.steps,
            "generator": self.generator.get_state(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the method and its config must match the saved ones."""
        if state.get("method") != self.name:
            raise ValueError(f"state is for method {state.get('method')!r}, not {self.name!r}")
        mine = asdict(self.config)
        differ = sorted(k for k, v in state["config"].items() if mine.get(k) != v)
        if differ:
            raise ValueError(
                f"state was saved with different settings {differ}: "
                f"saved {[state['config'][k] for k in differ]}, now {[mine.get(k) for k in differ]}; "
                "build the method with the saved config to resume"
            )
        self.steps = state["steps"]
        self.generator.set_state(state["generator"])
        self.load_extra_state(state["extra"])

    def remove(self) -> None:
        """Detach every hook this method added; the model is left exactly as before."""
        if self._depth:
            raise RuntimeError("remove() called inside `with method:`; leave the block first")
        self._namer.remove()
        self._removed = True


def _storage_key(tensor: torch.Tensor) -> tuple:
    if DTensor is not None and isinstance(tensor, DTensor):  # a sharded parameter (FSDP2): its shard's storage
        tensor = tensor.to_local()
    return tensor.device.type, tensor.device.index, tensor.untyped_storage().data_ptr()


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context where ``device``'s autocast is off: a no-op where it is off already (building an autocast
    context costs several microseconds of Python, per saved tensor) or on devices without autocast (``meta``)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# Autograd nodes of casts and views: a saved tensor reached from a parameter only through these is a copy
# of a weight (autocast's bf16 weight, a transposed weight), not an activation.
_WEIGHT_COPY_NODES = frozenset({
    "ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0",
    "UnsafeViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0", "AliasBackward0",
})


def _is_parameter(tensor: torch.Tensor) -> bool:
    """Parameters (also gathered ones, e.g. FSDP's), their views and autocast copies are never compressed.

    A copy made without grad (a frozen weight under autocast) has no autograd history and is not
    recognised; it is treated as an activation.
    """
    if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
        return True
    node = tensor.grad_fn
    while node is not None and node.name() in _WEIGHT_COPY_NODES:
        parents = [n for n, _ in node.next_functions if n is not None]
        if len(parents) != 1:
            return False
        node = parents[0]
    return node is not None and isinstance(getattr(node, "variable", None), nn.Parameter)
