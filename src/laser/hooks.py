"""Saved-tensor plumbing shared by every activation-memory method.

One :class:`ActivationMethod` sits between autograd and the tensors it saves for backward:

* **sites**: a site is one activation stream, ``"<module path>/<op>:<width>"``: the innermost module running
  when the storage is first saved, the autograd op that produced it (``mm``, ``silu``, ``mul``; ``input``
  for a tensor without history) and its row width. A second storage of the same module, op and width
  within one call of that module is a stream of its own (``mul#1``). A weight-tied block run at 24
  recursion steps is one site per stream.
* **what is never coded**: parameters and buffers and every copy of them (views such as ``weight.t()``,
  autocast casts, also of frozen weights), non-float tensors, tensors a backward reads as a mask or a sign
  (ReLU, threshold, hardtanh, leaky ReLU, clamp, max-pool, ...) and the loss's saved tensors: each is kept
  exactly, with its reason in the report.
* **exact where autograd is exact**: with saved-tensor hooks set, PyTorch skips its own version-counter
  check, so every saved tensor's version is recorded at pack and checked at unpack, raising autograd's
  "modified by an inplace operation" error. Raw-kept tensors are held detached, so a graph dropped without
  backward frees everything (no tensor -> grad_fn -> saved tensor cycle).
* **storage, not view**: autograd saves several views of one storage (q, k and v of one ``qkv`` output;
  a linear's input as a reshaped view). The base storage is encoded once and every view is rebuilt from
  it with ``as_strided``. Storages are keyed by address *and* a weak reference, because the allocator
  hands a freed storage's address to the next tensor of the same forward.
* **accounting**: raw and stored bytes are counted once per unique storage, per site and step; each
  storage kept raw carries its reason.
* **threads**: one method may be entered from several threads at once (hooks are thread-local; the
  shared state is locked).

A method subclasses :class:`ActivationMethod` and implements :meth:`ActivationMethod.encode` (and, if it
keeps state, :meth:`~ActivationMethod.update`, :meth:`~ActivationMethod.site_row` and the state hooks).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

from laser.config import OUTSIDE, SiteFilter
from laser.factored import FactoredLinear, LinearInput, WeightGradSink, same_basis

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    DTensor = None
from laser.report import Report, SiteReport


class Reason:
    """Why a saved storage was kept raw (the keys of :attr:`SiteReport.reasons`)."""

    RAW = "method"  # the method keeps every tensor as it is (``none``, the activation recorder)
    NOT_FLOAT = "not float"
    TOO_SMALL = "too small"  # under min_numel or min_dim
    EXCLUDED = "excluded"  # include / exclude patterns, or saved outside the model (model_only)
    LAYOUT = "layout"  # no dense rows to code (a channels-first conv activation, a strided view)
    MASK = "mask"  # read by its backward as a mask or a sign
    ATTENTION = "attention"  # the query or key of scaled_dot_product_attention (SiteFilter.exact_qk)
    LOSS = "loss"  # saved by a loss or a log-softmax
    BREAK_EVEN = "break-even"  # codes plus basis would not be smaller than the tensor this step
    FROZEN = "frozen"  # the site's rank can never beat break-even: no longer tracked
    GUARD = "guard"  # its own fidelity was under the threshold (policy "guarded")
    NONFINITE = "non-finite"
    UNTRACKED = "untracked"  # the site never reached its threshold through max_resets resets
    PENDING = "pending"  # not a reason: encode's answer "hold it raw, code it once the site's step pays"


# ----------------------------------------------------------------------------------------- what saves
def _functions(*names: str, modules: tuple = (torch, F, torch.Tensor)) -> list:
    """The torch functions and Tensor methods of these names that exist in this build."""
    return [getattr(m, n) for m in modules for n in names if hasattr(m, n)]


# Saved tensors that a backward reads only as a mask or a sign: a code that turns an exact 0 into 1e-3
# flips the mask at any rank (DESIGN hard part 11).
_MASK_FUNCTIONS = _functions(
    "relu", "relu_", "relu6", "threshold", "threshold_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_",
    "rrelu", "rrelu_", "prelu", "hardswish", "hardsigmoid", "clamp", "clamp_", "clip", "clip_", "clamp_min",
    "clamp_max", "abs", "abs_", "sign", "maximum", "minimum", "fmax", "fmin",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "fractional_max_pool2d", "fractional_max_pool3d", "max_unpool2d",
)
# Autograd nodes that save their own output as a mask (in-place activations, functional relu).
_MASK_NODES = frozenset({"relu", "threshold", "hardtanh", "leakyrelu", "rrelu"})
_LOSS_FUNCTIONS = _functions(
    "log_softmax", "cross_entropy", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "kl_div", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "soft_margin_loss",
    "multilabel_soft_margin_loss", "multilabel_margin_loss", "multi_margin_loss", "poisson_nll_loss",
    "gaussian_nll_loss", "ctc_loss", "cosine_embedding_loss", "margin_ranking_loss", "hinge_embedding_loss",
    "triplet_margin_loss", "triplet_margin_with_distance_loss",
)
# Functions whose saved activations are (N, C, *spatial): coded over channels, never over image rows.
_SPATIAL_FUNCTIONS = _functions(
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "batch_norm",
    "instance_norm", "group_norm", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "lp_pool2d", "interpolate", "upsample", "pixel_shuffle",
    modules=(torch, F),
)
_SPATIAL_NODES = re.compile(r"convolution|batchnorm|groupnorm|pool\dd|upsample|pixelshuffle")
MASK, LOSS, SPATIAL, ATTENTION, LINEAR = "mask", "loss", "spatial", "attention", "linear"
_KINDS = {f: kind for kind, fs in ((SPATIAL, _SPATIAL_FUNCTIONS), (MASK, _MASK_FUNCTIONS), (LOSS, _LOSS_FUNCTIONS))
          for f in fs}
_KINDS[F.scaled_dot_product_attention] = ATTENTION
_KINDS[F.linear] = LINEAR
_PLAIN = (torch.Tensor, nn.Parameter)
_ACTIVE = threading.local()  # .stack: see _active_stack


class CodedSaves:
    """Base of saved-tensor hooks whose saves end up with :attr:`method` (:func:`laser.checkpoint`'s): under
    them ``F.linear`` takes the factored path as under the method's own hooks."""

    method: ActivationMethod


def _active_stack() -> list[ActivationMethod]:
    """The methods this thread is inside ``with method:`` of, innermost last."""
    if not hasattr(_ACTIVE, "stack"):
        _ACTIVE.stack = []
    return _ACTIVE.stack


def active_method() -> ActivationMethod | None:
    """The innermost method this thread is inside ``with method:`` of, or None."""
    stack = _active_stack()
    return stack[-1] if stack else None


class _SaverMode(TorchFunctionMode):
    """Knows, while a torch function runs, whether the tensors it saves are masks, loss terms or spatial,
    and runs ``F.linear`` as :class:`~laser.factored.FactoredLinear` for a method that codes linear inputs.

    Saved-tensor hooks see a tensor, not the op saving it; an op that saves its input as a mask (hardtanh,
    leaky ReLU, max-pool) cannot be told from its grad_fn. Only the few functions in ``_KINDS`` do any work
    here; every other call passes straight through. Inside a compiled region it does nothing (the compiled
    graph saves its tensors itself, see :meth:`ActivationMethod._warn_if_compiled`).
    """

    def __init__(self, factored: ActivationMethod | None = None) -> None:
        super().__init__()
        self.kind: str | None = None
        self.scores: tuple[int, ...] = ()  # storages of the query and key of the attention running now
        self.inputs: tuple[torch.Tensor, ...] = ()  # its query, key and value
        self.factored = factored  # the method whose hooks code linear inputs for factored gradients, or None
        self.link: LinearInput | None = None  # the factored linear saving its input now
        # per weight (by id) in this forward: the weight, and the bases its inputs were coded against with
        # their WeightGradSink stand-ins
        self.sinks: dict[int, tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _KINDS.get(func)
        if kind is None or self.kind is not None or torch.compiler.is_compiling():
            return func(*args, **(kwargs or {}))
        if kind == LINEAR:
            return self._linear(func, args, kwargs or {})
        self.kind = kind
        if kind == ATTENTION:
            kwargs = kwargs or {}
            query = args[0] if len(args) > 0 else kwargs.get("query")
            key = args[1] if len(args) > 1 else kwargs.get("key")
            value = args[2] if len(args) > 2 else kwargs.get("value")
            self.scores = tuple(t.untyped_storage().data_ptr() for t in (query, key) if isinstance(t, torch.Tensor))
            self.inputs = tuple(t for t in (query, key, value) if isinstance(t, torch.Tensor))
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.kind, self.scores, self.inputs = None, (), ()

    def columns_read(self, tensor: torch.Tensor, width: int) -> tuple[int, int, int] | None:
        """The block of columns the running attention reads of ``tensor``'s storage as rows of ``width``: the
        union over its query, key and value views of that storage (see :func:`view_columns`); None: whole rows.

        A fused ``qkv`` output whose q and k went through RoPE (new storages) is saved only as the value
        slice: coding whole rows spends the rank on q and k, which nothing reads, and measures a fidelity that
        says nothing of v (trained quick-preset TRM, ``laser:max_error=0.1``: whole-model gradient cosine 0.86
        whole rows, 0.99 value columns; ``python benchmarks/grad_probe.py RUN laser:max_error=0.1``).
        """
        storage = tensor.untyped_storage().data_ptr()
        blocks = [view_columns(t, width) for t in self.inputs if t.untyped_storage().data_ptr() == storage]
        if not blocks or None in blocks:
            return None
        first, end = min(b[0] for b in blocks), max(b[1] for b in blocks)
        return None if (first, end) == (0, width) else (first, end, width)

    def _linear(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        """``F.linear`` as :class:`~laser.factored.FactoredLinear` where its saved input may be coded; else as is.

        It takes the factored path only where autograd would save the input for a weight gradient (grad on,
        a 2-D weight that needs one), the tensors are plain (no subclass with its own ``__torch_function__``),
        and the method's hooks are the innermost, or those of a :class:`CodedSaves` of the method
        (:func:`laser.checkpoint`'s forward and rerun alike): inside a ``torch.utils.checkpoint`` region the
        checkpoint's hooks take the saves, and the op runs as it is, so both runs save the same tensors. Under
        autocast the input is cast here, as autocast would cast it, and the weight and bias inside, from
        autocast's cache. Once a call of a weight saved its input coded, later
        calls of that weight in the same forward share one :class:`~laser.factored.WeightGradSink` for that
        basis (the recursion steps of a loop sum ``dY^T Z`` before one product with ``Q^T``); a weight whose
        inputs come from several sites has one per site.
        """
        x = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if (self.factored is None or not torch.is_grad_enabled() or type(x) not in _PLAIN
                or type(weight) not in _PLAIN or not weight.requires_grad or weight.dim() != 2 or x.dim() == 0
                or (bias is not None and type(bias) not in _PLAIN) or self._too_small(x)):
            return func(*args, **kwargs)
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        owner = getattr(hooks[0], "__self__", None) if hooks is not None else None
        if hooks is None or (hooks[0] is not self.factored.pack_hook
                             and not (isinstance(owner, CodedSaves) and owner.method is self.factored)):
            return func(*args, **kwargs)
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.is_floating_point():
            dtype = torch.get_autocast_dtype(device)
            if x.dtype not in (dtype, torch.float64):
                x = x.to(dtype)
        link = self.link = LinearInput()
        _, bases, sinks = self.sinks.setdefault(id(weight), (weight, [], []))
        self.kind = LINEAR
        try:
            rows = FactoredLinear.apply(x, weight, bias, link, tuple(bases), *sinks)  # (N, Dout)
        finally:
            self.kind, self.link = None, None
        if link.basis is not None and not any(same_basis(link.basis, b) for b in bases):
            bases.append(link.basis)
            sinks.append(WeightGradSink.apply(weight, link.basis))
        return rows if x.dim() == 2 else rows.view(*x.shape[:-1], weight.shape[0])

    def _too_small(self, x: torch.Tensor) -> bool:
        """Whether ``x`` can never be coded (its storage under ``min_numel``, rows under ``min_dim``): the
        factored path's own host time (an autograd function in Python) would buy nothing."""
        config = self.factored.config
        return x.shape[-1] < config.min_dim or x.untyped_storage().nbytes() < config.min_numel * x.element_size()

    def saving_scores(self, storage: torch.UntypedStorage) -> bool:
        """Whether ``storage`` is the query or key of the attention saving now (see ``SiteFilter.exact_qk``)."""
        return self.kind == ATTENTION and storage.data_ptr() in self.scores


# ------------------------------------------------------------------------------------------- sites
class _Frame:
    """One running module call: its path and how many storages of each (op, width) it has saved."""

    __slots__ = ("label", "counts")

    def __init__(self, label: str) -> None:
        self.label, self.counts = label, {}


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
            self._handles.append(module.register_forward_hook(_Pop(self._local, label), always_call=True))

    def current(self) -> str:
        """Path of the innermost module running now (``OUTSIDE`` when no module runs)."""
        return self._frame().label

    def name(self, op: str, width: int, storage: torch.UntypedStorage) -> str:
        """The site of a new storage made by ``op`` with rows of ``width``.

        Its module is the one that returned the storage as its output, if one did (two sibling linears
        whose outputs the parent saves are two streams), else the module running now; a storage saved while
        no module of the model runs (the loss) is named ``OUTSIDE``. The n-th storage of
        one (module, op, width) within one call of the running module (n >= 1) is its own stream, ``op#n``.
        Counts restart whenever a child module returns, so a loop in a parent that calls a child each
        iteration names its steps alike.
        """
        frame = self._frame()
        label = frame.label
        made = getattr(self._local, "outputs", {}).get(storage.data_ptr())
        if made is not None and not made[1].expired() and label != OUTSIDE:  # saved outside: the loss's
            label = made[0]
        key = (label, op, width)
        n = frame.counts.get(key, 0)
        frame.counts[key] = n + 1
        return f"{label}/{op}#{n}:{width}" if n else f"{label}/{op}:{width}"

    def restart(self) -> None:
        """A new forward begins: forget what was saved outside the model and which module made what."""
        self._local.outside = _Frame(OUTSIDE)
        self._local.outputs = {}

    def _frame(self) -> _Frame:
        stack = getattr(self._local, "stack", None)
        if stack:
            return stack[-1]
        outside = getattr(self._local, "outside", None)
        if outside is None:
            outside = self._local.outside = _Frame(OUTSIDE)
        return outside

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
        self.local.stack.append(_Frame(self.label))


class _Pop(_Hook):
    def __init__(self, local: threading.local, label: str) -> None:
        self.local, self.label = local, label

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        stack = getattr(self.local, "stack", None)
        if stack:
            stack.pop()
        outputs = getattr(self.local, "outputs", None)
        if torch.compiler.is_compiling():  # inside a compiled graph: its saved tensors are named by order
            return
        if outputs is not None and isinstance(output, torch.Tensor) and output.requires_grad:
            storage = output.untyped_storage()  # the innermost module that returns a storage made it
            made = outputs.get(storage.data_ptr())
            if made is None or made[1].expired():
                outputs[storage.data_ptr()] = (self.label, StorageWeakRef(storage))
        parent = stack[-1] if stack else getattr(self.local, "outside", None)
        if parent is not None:
            parent.counts.clear()


_NODE_SUFFIX = re.compile(r"Backward\d*$")
_FACTORED_NODE = FactoredLinear._backward_cls
_OP_NAMES: dict[str, str] = {}


def producer(tensor: torch.Tensor) -> str:
    """The autograd op that made ``tensor`` (views and casts looked through), lower case; ``input`` without one."""
    node = tensor.grad_fn
    while node is not None and node.name() in _WEIGHT_COPY_NODES:
        parents = [n for n, _ in node.next_functions if n is not None]
        if len(parents) != 1:
            break
        node = parents[0]
    if node is None:
        return "input"
    if type(node) is _FACTORED_NODE:  # named as autograd's own linear would be
        return node.op
    raw = node.name()
    op = _OP_NAMES.get(raw)
    if op is None:
        op = _OP_NAMES[raw] = _NODE_SUFFIX.sub("", raw.rsplit("::", 1)[-1]).lower() or "op"
    return op


# ------------------------------------------------------------------------------------------ records
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

    # Whether :meth:`factors` can hand a linear's backward codes and basis instead of a reconstruction,
    # and that basis (the same tensor for every record of a site's step).
    factored = False
    basis: torch.Tensor | None = None
    # Whether :meth:`decode_columns` rebuilds a block of columns alone: a view reading part of each row (one
    # half of a gate/up output) is then decoded by itself, not through the whole storage's held decode.
    column_decode = False

    def decode(self) -> torch.Tensor:
        """The storage's content as a flat tensor in its original dtype."""
        raise NotImplementedError

    def factors(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes (count, k), basis (D, k))`` of rows ``first .. first + count`` of the storage as (rows, D),
        both in the basis's dtype: those rows are ``codes @ basis.T`` (only where :attr:`factored`)."""
        raise NotImplementedError

    def decode_columns(self, first: int, end: int) -> torch.Tensor:
        """Columns ``first .. end`` of the storage as rows (N, end - first), contiguous, in its dtype (only
        where :attr:`column_decode`)."""
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


class ColumnBlock(Packed):
    """A storage of which saved views read only a block of columns of each row (the value slice of a fused
    ``qkv`` output, which attention saves alone): ``inner`` holds those columns coded; the rest decode to
    zeros that no view reads. Never factored (a linear's input is whole rows)."""

    def __init__(self, inner: Packed, rows: int, columns: tuple[int, int, int]) -> None:
        super().__init__(inner.nbytes, inner.shared)
        self.inner, self.rows, self.columns = inner, rows, columns

    def decode(self) -> torch.Tensor:
        first, end, width = self.columns
        block = self.inner.decode().view(self.rows, end - first)
        flat = block.new_zeros(self.rows, width)
        flat[:, first:end] = block
        return flat.view(-1)


def view_columns(view: torch.Tensor, width: int) -> tuple[int, int, int] | None:
    """``(first, end, width)``: the block of columns a view reads of its storage laid out as rows of
    ``width``, when that is a proper part of the row; None when it reads whole rows (or is not a column block).

    Dimensions whose stride is a multiple of ``width`` move between rows; the others move within a row, and
    their extent from the view's first column must stay inside it.
    """
    return layout_columns(view.shape, view.stride(), view.storage_offset(), width)


def layout_columns(shape: Sequence[int], strides: Sequence[int], offset: int,
                   width: int) -> tuple[int, int, int] | None:
    """:func:`view_columns` of a view given by its layout (sizes, strides, storage offset)."""
    first = offset % width
    end = first + 1
    for size, stride in zip(shape, strides, strict=True):
        if size > 1 and stride % width:
            if stride > width:
                return None
            end += (size - 1) * stride
    if end > width or (first == 0 and end == width):
        return None
    return first, end, width


def _within(columns: tuple[int, int, int] | None, block: tuple[int, int, int]) -> bool:
    """Whether a view reading ``columns`` (None: whole rows) reads only columns of ``block``."""
    return columns is not None and block[0] <= columns[0] and columns[1] <= block[1]


_EMPTY: dict[torch.device, torch.UntypedStorage] = {}


def version_probe(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that shares ``tensor``'s version counter but none of its memory.

    A coded storage must be freed, yet an in-place change to it before backward must still raise: the
    probe is a detached alias moved onto an empty storage (``set_`` bumps the shared counter once; the
    count is put back).
    """
    version = tensor._version
    with torch.no_grad():
        probe = tensor.detach()
        empty = _EMPTY.get(tensor.device)
        if empty is None:
            empty = _EMPTY[tensor.device] = torch.empty(0, dtype=torch.uint8, device=tensor.device).untyped_storage()
        probe.set_(empty, 0, (0,), (1,))
        torch._C._autograd._unsafe_set_version_counter((probe,), (version,))
    return probe


def check_version(alias: torch.Tensor, saved: int, size: torch.Size) -> None:
    """Raise autograd's own error when a saved tensor was changed in place after it was saved."""
    if alias._version != saved:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"[{alias.type()} {list(size)}] is at version {alias._version}; expected version {saved} instead. "
            "Hint: the tensor was changed in place between forward and backward (an optimizer step before "
            "backward, an in-place op on a saved activation); laser checks this because saved-tensor hooks "
            "turn autograd's own check off."
        )


class _Raw:
    """What autograd holds for a weight: the tensor detached (no reference cycle) and its version."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.version = tensor.detach(), tensor._version


class _Entry:
    """One storage saved in the current forward: raw, coded, or pending (held raw until its site's step has
    enough bytes to pay for the site's basis, then coded; see :data:`Reason.PENDING`)."""

    __slots__ = ("ref", "version", "account", "record", "probe", "rows", "saved", "columns")

    def __init__(self, tensor: torch.Tensor, account: SiteAccount,
                 columns: tuple[int, int, int] | None = None) -> None:
        self.ref, self.version, self.account = StorageWeakRef(tensor.untyped_storage()), tensor._version, account
        self.columns = columns  # (first, end, row width): only these columns of each row are coded
        self.record: Packed | None = None
        self.probe: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None  # (N, D) over the storage while pending
        self.saved: list[_Saved] = []  # views handed out while pending: their tensors go once it is coded

    def code(self, record: Packed) -> None:
        """Store the storage as ``record`` from now on; views saved while it was pending let go of it."""
        if self.columns is not None:
            record = ColumnBlock(record, self.rows.shape[0], self.columns)
        self.record, self.probe = record, version_probe(self.rows)
        for saved in self.saved:
            saved.tensor = None
            saved.count_view()
        self.settle()

    def settle(self) -> None:
        """No longer pending (coded, or raw for good)."""
        self.rows, self.saved = None, []


class _Saved:
    """What autograd holds for one saved view of an activation storage: the view itself (detached) while
    the storage is raw, else the storage's record and the view's layout; the version it was saved at.

    ``link`` is set for the input of a factored linear whose rows are whole rows of the storage: where the
    record can give codes (:attr:`Packed.factored`), unpacking hands them to the linear's backward instead
    of decoding.
    """

    __slots__ = ("entry", "tensor", "version", "size", "stride", "offset", "link")

    def __init__(self, entry: _Entry, tensor: torch.Tensor, link: LinearInput | None = None) -> None:
        self.entry, self.version, self.link = entry, tensor._version, link
        self.tensor = tensor.detach() if entry.record is None else None
        self.size, self.stride, self.offset = tensor.size(), tensor.stride(), tensor.storage_offset()
        if entry.rows is not None:
            entry.saved.append(self)
        elif entry.record is not None:
            self.count_view()

    def factored(self) -> bool:
        """Whether backward gets this view as codes (a coded storage whose record gives them)."""
        return self.link is not None and self.entry.record.factored

    def column_block(self) -> tuple[int, int, int] | None:
        """``(first, end, width)``: the part of its storage's rows this view reads, where backward decodes those
        columns alone (a record with :attr:`Packed.column_decode`, rows of the site's width); else None."""
        width = self.entry.account.dim
        if not self.entry.record.column_decode or self.entry.columns is not None or width <= 0:
            return None
        return layout_columns(self.size, self.stride, self.offset, width)

    def count_view(self) -> None:
        """Count this view, now backed by the entry's record: a view to decode whole, by its columns, or a
        factored one."""
        if self.factored():
            self.entry.account.factored += 1
            self.link.basis = self.entry.record.basis
        elif self.column_block() is None:
            self.entry.record.views += 1


@dataclass
class SiteAccount:
    """Bytes and counts of one site during the current step."""

    dim: int
    raw_bytes: int = 0
    stored_bytes: int = 0
    tensors: int = 0
    reasons: Counter = field(default_factory=Counter)
    pending: list = field(default_factory=list)  # entries held raw until the site's step pays for its basis
    shared: dict[int, torch.Tensor] = field(default_factory=dict)
    factored: int = 0  # saved linear inputs whose weight gradient is made from the codes

    def raw_reasons(self) -> dict[str, int]:
        """Why storages were kept raw this step (pending ones count as break-even so far)."""
        reasons = dict(self.reasons)
        if self.pending:
            reasons[Reason.BREAK_EVEN] = reasons.get(Reason.BREAK_EVEN, 0) + len(self.pending)
        return reasons

    @property
    def fallbacks(self) -> int:
        """Storages kept raw this step, for any reason."""
        return sum(self.reasons.values()) + len(self.pending)


def row_width(base: torch.Tensor, fold_to: int = 0) -> int:
    """Width of the rows a storage is coded in: its innermost dimension, folded up to ``fold_to``; 0: none.

    The dimensions of ``base`` are taken in memory order (innermost first) and merged into the row while
    each continues the dense block before it (stride == the block's size) and the merged width stays
    <= ``fold_to``. The layout is what counts, not the dimension order: attention heads (B, H, L, hd) with
    the strides of a (B, L, H, hd) tensor fold into rows of H*hd per token when ``fold_to`` >= H*hd, while
    a heads-major (B, H, L, hd) tensor would need L*hd and is left alone for a ``fold_to`` of the model
    width. Size-1 dimensions are skipped. A tensor whose last dimension is not innermost has no rows (0),
    unless ``channels`` asks for rows over dimension 1 (see :func:`channel_width`).
    """
    if base.dim() == 0:
        return 1
    width = base.shape[-1]
    if base.stride(-1) != 1 and width > 1:
        return 0
    if width >= fold_to:  # no dimension could merge; skips the sort on the hot path
        return width
    dims = sorted((d for d in range(base.dim() - 1) if base.shape[d] > 1), key=base.stride)
    for d in dims:
        if base.stride(d) != width or width * base.shape[d] > fold_to:
            break
        width *= base.shape[d]
    return width


def channel_width(base: torch.Tensor) -> int:
    """Rows over the channels of an (N, C, *spatial) activation: C when channels are innermost (channels_last),
    else 0 (channels-first rows would be image rows, a stream with no shared basis)."""
    if base.dim() < 3 or base.stride(1) != 1:
        return 0
    return base.shape[1]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's own elements."""
    return t.numel() * t.element_size()


class ActivationMethod(torch.autograd.graph.saved_tensors_hooks):
    """Base class of every activation-memory method: hooks, sites, dedupe and byte accounting.

    The hooks are active only inside ``with method:``; nesting the same method is allowed and
    installs the hooks once per thread. Module hooks that name sites stay until :meth:`remove`.

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
        self._thread = threading.local()  # this thread's nesting depth and saver mode
        self._lock = threading.RLock()
        self._active = 0  # threads inside `with method:`
        self._live: dict[tuple, _Entry] = {}
        self._weight_storages: set[tuple] = set()
        self._weight_casts: dict[tuple[int, ...], set[torch.dtype]] = {}  # shape -> dtypes of weights
        self._accounts: dict[str, SiteAccount] = {}
        self._recomputed: dict[str, SiteAccount] = {}  # sites of tensors saved by laser.checkpoint's reruns
        self._last: Report | None = None
        self._removed = False
        self._warn_if_compiled()
        self.seconds = {"encode": 0.0, "decode": 0.0, "update": 0.0}

    # ----------------------------------------------------------------- context
    def __enter__(self) -> ActivationMethod:
        if self._removed:
            raise RuntimeError(f"{type(self).__name__} was removed; build a new one to use it again")
        depth = getattr(self._thread, "depth", 0)
        if depth == 0:
            with self._lock:
                if self._active == 0:
                    self._remember_weights()
                self._active += 1
            self._namer.restart()
            _active_stack().append(self)
            super().__enter__()
            self._thread.mode = _SaverMode(self if self.factored_linears else None)
            self._thread.mode.__enter__()
        self._thread.depth = depth + 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.depth -= 1
        if self._thread.depth == 0:
            self._thread.mode.__exit__(*exc)
            self._thread.mode = None
            super().__exit__(*exc)
            _active_stack().remove(self)
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._settle_pending()
                    self._live.clear()

    def running_link(self) -> LinearInput | None:
        """The :class:`~laser.factored.LinearInput` of the factored linear saving its tensors in this thread
        now, or None."""
        mode = getattr(self._thread, "mode", None)
        return mode.link if mode is not None else None

    def active_in_thread(self) -> bool:
        """Whether this thread is inside ``with method:``."""
        return getattr(self._thread, "depth", 0) > 0

    @contextlib.contextmanager
    def recomputation(self):
        """Storages first saved in this thread inside this context are a checkpointed region's rerun
        (:func:`laser.checkpoint`): held one region at a time during backward, so the report lists them
        apart (:attr:`Report.recomputed`), outside its totals."""
        before = getattr(self._thread, "recomputing", False)
        self._thread.recomputing = True
        try:
            yield
        finally:
            self._thread.recomputing = before

    def _remember_weights(self) -> None:
        """Parameters and buffers by storage, and the shapes and dtypes of their casts (see :meth:`_is_weight`)."""
        tensors = list(chain(self.model.parameters(), self.model.buffers()))
        self._weight_storages = {_storage_key(t) for t in tensors}
        self._weight_casts = {}
        for t in tensors:
            if t.dim() >= 1 and t.is_floating_point():
                self._weight_casts.setdefault(tuple(t.shape), set()).add(t.dtype)

    # ------------------------------------------------------------------- hooks
    def _pack(self, tensor: torch.Tensor) -> object:
        if self._is_weight(tensor):
            return _Raw(tensor)
        key = _storage_key(tensor)
        with self._lock:
            entry = self._live.get(key)
            if entry is None or entry.ref.expired() or entry.version != tensor._version:
                start = time.perf_counter()
                entry = self._live[key] = self._new_entry(tensor)
                self.seconds["encode"] += time.perf_counter() - start
            elif entry.record is not None or entry.rows is not None:
                reason = self._exact_reason(tensor, self._saver_kind())
                if reason is None and entry.columns is not None \
                        and not _within(view_columns(tensor, entry.columns[2]), entry.columns):
                    reason = Reason.LAYOUT
                if reason is not None:
                    return self._exact_view(entry, tensor, reason)
            return _Saved(entry, tensor, self._linear_input(tensor, entry.account.dim))

    def _linear_input(self, tensor: torch.Tensor, width: int) -> LinearInput | None:
        """The factored linear saving ``tensor`` now, where its rows are whole rows of its storage (dense,
        starting at a row, rows of the site's width); else None."""
        mode = getattr(self._thread, "mode", None)
        if mode is None or mode.link is None or tensor.shape[-1] != width or tensor.storage_offset() % width \
                or not tensor.is_contiguous():
            return None
        return mode.link

    def _unpack(self, packed: _Raw | _Saved) -> torch.Tensor:
        if packed.tensor is not None:
            check_version(packed.tensor, packed.version, packed.tensor.size())
            return packed.tensor
        check_version(packed.entry.probe, packed.version, packed.size)
        record = packed.entry.record
        # A backward that builds a graph (create_graph) differentiates through the input: it gets it decoded.
        if packed.factored() and not torch.is_grad_enabled():
            width = packed.entry.account.dim
            packed.link.factors = record.factors(packed.offset // width, packed.size.numel() // width)
            return packed.entry.probe.new_empty(0)  # a stand-in: the linear's backward reads the factors
        start = time.perf_counter()
        columns = packed.column_block()
        if columns is None:
            view = record.decoded().as_strided(packed.size, packed.stride, packed.offset)
        else:  # the view's columns alone, as rows of their own width
            first, end, width = columns
            count = end - first
            stride = [s // width * count if s % width == 0 else s for s in packed.stride]
            view = record.decode_columns(first, end).as_strided(packed.size, stride, packed.offset // width * count)
        self.seconds["decode"] += time.perf_counter() - start
        return view

    def _saver_kind(self) -> str | None:
        mode = getattr(self._thread, "mode", None)
        return mode.kind if mode is not None else None

    @property
    def factored_linears(self) -> bool:
        """Whether ``F.linear`` inside ``with method:`` takes the factored path (its input's codes make the
        weight gradient); the base method stores nothing as codes."""
        return False

    def _exact_reason(self, tensor: torch.Tensor, kind: str | None) -> str | None:
        """The reason the op saving ``tensor`` now needs it exact (mask, loss, attention scores), or None."""
        if kind == MASK:
            return Reason.MASK
        if kind == LOSS:
            return Reason.LOSS
        if kind == ATTENTION and self.config.exact_qk and self._thread.mode.saving_scores(tensor.untyped_storage()):
            return Reason.ATTENTION
        return None

    def _exact_view(self, entry: _Entry, tensor: torch.Tensor, reason: str) -> _Raw:
        """A coded or pending storage saved again, now by an op that needs it exact or reading columns its
        codes do not hold (``reason``): this view is kept exact.

        A pending storage stays raw for good. A coded one keeps its codes for the views handed out before
        (their backward reads values); this view holds the tensor, which stays alive, so the storage's bytes
        are counted again.
        """
        account = entry.account
        if entry.rows is not None:
            account.pending.remove(entry)
            entry.settle()
        else:
            account.stored_bytes += tensor.untyped_storage().nbytes()
        account.reasons[reason] += 1
        return _Raw(tensor)

    def _is_weight(self, tensor: torch.Tensor) -> bool:
        """Parameters and buffers, their views, gathered copies (FSDP) and casts are never activations.

        A cast made without grad (a frozen weight under autocast) has no autograd history: a saved tensor
        without history with the shape of a parameter or buffer of another dtype is taken for such a copy
        (kept raw either way, so a mistake costs memory, never gradient).
        """
        if _is_parameter(tensor) or _storage_key(tensor) in self._weight_storages:
            return True
        if tensor.grad_fn is None and not tensor.requires_grad:
            base = tensor._base if tensor._base is not None else tensor
            dtypes = self._weight_casts.get(tuple(base.shape))
            return dtypes is not None and base.dtype not in dtypes
        return False

    def _new_entry(self, tensor: torch.Tensor) -> _Entry:
        """Name, account and (when admitted) encode a storage seen for the first time in this forward."""
        base = tensor._base if tensor._base is not None else tensor
        kind = self._saver_kind()
        op = producer(base)
        if kind in (None, LINEAR) and op in _MASK_NODES:
            kind = MASK
        spatial = kind == SPATIAL or _SPATIAL_NODES.search(op) is not None
        width = row_width(base, self.config.fold_to) if not spatial or base.dim() < 3 else 0
        if width == 0 and (spatial or base.dim() >= 4):  # channels_last: over channels; image rows never
            width = channel_width(base)
        # Attention may save only a slice of a fused projection (the value, see _SaverMode.columns_read); other
        # ops' views of one storage (a gate/up output's halves) are read together and coded as whole rows.
        columns = self._thread.mode.columns_read(tensor, width) if kind == ATTENTION and width > 0 else None
        coded = columns[1] - columns[0] if columns is not None else width
        site = self._namer.name(op, coded, tensor.untyped_storage())
        accounts = self._recomputed if getattr(self._thread, "recomputing", False) else self._accounts
        account = accounts.get(site)
        if account is None:
            account = accounts[site] = SiteAccount(coded)
        storage_bytes = tensor.untyped_storage().nbytes()
        account.raw_bytes += storage_bytes
        account.tensors += 1
        account.stored_bytes += storage_bytes
        reason = self._refusal(tensor, base, site, width, coded, kind, storage_bytes)
        record = result = rows = None
        if reason is None:
            numel = storage_bytes // tensor.element_size()
            rows = tensor.detach().as_strided((numel // width, width), (width, 1), 0)  # (N, W) over the storage
            if columns is not None:
                rows = rows[:, columns[0]:columns[1]]  # (N, D): the columns the saved view reads
            with torch.no_grad(), autocast_off(rows.device):
                result = self.encode(rows, site)
            if isinstance(result, Packed):
                record = result
            elif result is not Reason.PENDING:
                reason = result
        entry = _Entry(tensor, account, columns if record is not None or result is Reason.PENDING else None)
        if result is Reason.PENDING:
            entry.rows = rows
            account.pending.append(entry)
        elif record is None:
            account.reasons[reason] += 1
        else:
            entry.rows = rows
            entry.code(record)
            self._charge(account, record, storage_bytes)
            self._code_pending(site, account)
        return entry

    def _charge(self, account: SiteAccount, record: Packed, storage_bytes: int) -> None:
        """Account a storage stored as ``record`` instead of raw (its record's bytes, shared tensors once)."""
        account.stored_bytes += record.nbytes - storage_bytes
        for shared in record.shared:
            if id(shared) not in account.shared:
                account.shared[id(shared)] = shared
                account.stored_bytes += tensor_bytes(shared)

    def _code_pending(self, site: str, account: SiteAccount) -> None:
        """The site's step now pays for its basis: encode the storages it held raw meanwhile."""
        pending, account.pending = account.pending, []
        for entry in pending:
            with torch.no_grad(), autocast_off(entry.rows.device):
                result = self.encode(entry.rows, site)
            if isinstance(result, Packed):
                storage_bytes = entry.rows.untyped_storage().nbytes()
                entry.code(result)
                self._charge(account, result, storage_bytes)
            else:
                account.reasons[Reason.BREAK_EVEN if result is Reason.PENDING else result] += 1
                entry.settle()

    def _settle_pending(self) -> None:
        """End of a forward: storages still pending stay raw for this step (break-even)."""
        for account in chain(self._accounts.values(), self._recomputed.values()):
            if account.pending:
                for entry in account.pending:
                    entry.settle()
                account.reasons[Reason.BREAK_EVEN] += len(account.pending)
                account.pending = []

    def _refusal(self, tensor: torch.Tensor, base: torch.Tensor, site: str, width: int, coded: int,
                 kind: str | None, storage_bytes: int) -> str | None:
        """Why a new storage (rows of ``width``, of which ``coded`` columns are read) may not be encoded, or
        ``None`` when it is admitted."""
        if not tensor.is_floating_point():
            return Reason.NOT_FLOAT
        exact = self._exact_reason(tensor, kind)
        if exact is not None:
            return exact
        if width <= 0 or storage_bytes % (tensor.element_size() * width):
            return Reason.LAYOUT
        numel = storage_bytes // tensor.element_size()
        if numel < self.config.min_numel or coded < self.config.min_dim:
            return Reason.TOO_SMALL
        if not self.config.admits(site):
            return Reason.EXCLUDED
        return None

    def _warn_if_compiled(self) -> None:
        """Say once what site names lose where part of the model runs as a torch.compile graph."""
        compiled = [name or type(m).__name__ for name, m in self.model.named_modules()
                    if _is_compiled(m)]
        if not compiled:
            return
        warnings.warn(
            f"{type(self).__name__}: {', '.join(compiled[:3])}{' ...' if len(compiled) > 3 else ''} run(s) as a "
            "torch.compile graph, which saves its tensors itself: module hooks inside it are traced away, so its "
            "sites are named by the compiled module and their order in the graph ('<module>/input#n:<width>'), "
            "include/exclude patterns on modules inside it do not match, and recursion steps unrolled inside "
            "the graph do not share a basis. Compile the block the loop calls (torch.compile(block)) rather "
            "than the loop to keep one site per stream across recursion steps.",
            stacklevel=4,  # the user's line that built the method (through a subclass's __init__)
        )

    # ------------------------------------------------------- for subclasses
    def encode(self, x: torch.Tensor, site: str) -> Packed | str:
        """Encode one admitted storage viewed as ``x`` (N, D), or return the :class:`Reason` it stays raw.

        :data:`Reason.PENDING` holds it raw for now: it is encoded again (the same call) as soon as a later
        storage of the site in the same forward is encoded, and stays raw (break-even) if none is.
        Runs without grad and without autocast. The base method keeps everything raw.
        """
        return Reason.RAW

    def update(self) -> None:
        """Update method state between steps (basis tracking); the base method has none."""

    def clear_step(self) -> None:
        """Forget the step's statistics, once its report is built; the base method keeps none."""

    def site_row(self, site: str, account: SiteAccount) -> SiteReport:
        """The report row of one site for the current step."""
        return SiteReport(site, account.dim, account.dim, 1.0, account.raw_bytes, account.stored_bytes,
                          account.tensors, fallbacks=account.fallbacks, reasons=account.raw_reasons(),
                          factored=account.factored)

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
        with self._lock:
            self.update()
            self._last = self._build_report()
            self.clear_step()
            self._accounts, self._recomputed = {}, {}
        self.seconds["update"] += time.perf_counter() - start
        self.steps += 1

    def report(self) -> Report:
        """The current step's report if anything was saved since the last :meth:`step`, else the last."""
        if self._accounts or self._recomputed or self._last is None:
            return self._build_report()
        return self._last

    def _build_report(self) -> Report:
        rows = [self.site_row(site, account) for site, account in sorted(self._accounts.items())]
        recomputed = [self.site_row(site, account) for site, account in sorted(self._recomputed.items())]
        return Report(rows, method=self.name, step=self.steps, recomputed=recomputed)

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
        if self._active:
            raise RuntimeError("remove() called inside `with method:`; leave the block first")
        self._namer.remove()
        self._removed = True


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper or was compiled in place (``module.compile()``)."""
    return type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None


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
    """Parameters (also gathered ones, e.g. FSDP's), their views and autocast copies with autograd history."""
    if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
        return True
    node = tensor.grad_fn
    while node is not None and node.name() in _WEIGHT_COPY_NODES:
        parents = [n for n, _ in node.next_functions if n is not None]
        if len(parents) != 1:
            return False
        node = parents[0]
    return node is not None and isinstance(getattr(node, "variable", None), nn.Parameter)
