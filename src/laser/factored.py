"""Factored weight gradients: a linear layer's saved input is used as its codes, never reconstructed.

For ``y = x W^T + b`` autograd saves ``x`` only for ``grad_W = dY^T x`` (``grad_x = dY W`` needs no ``x``).
With ``x`` stored as codes ``Z = x Q`` against an orthonormal basis ``Q`` (``x ~ Z Q^T``),
``grad_W = (dY^T Z) Q^T``: ``N Dout k + Dout k Din`` multiply-adds instead of the reconstruction's ``N k Din``
plus the baseline's own ``N Dout Din`` (DESIGN hard part 13). At full rank it is the exact gradient up to
rounding; at low rank it equals reconstruct-then-matmul up to rounding (the same product, associated
differently). The recursion steps of a weight-tied loop share ``Q``, so the (Dout, k) products ``dY^T Z`` of all
steps are summed before the one product with ``Q^T`` (:class:`WeightGradSink`): per step ``N Dout k`` instead of
``N Dout k + Dout k Din``.

:class:`FactoredLinear` is the autograd function the saver mode of :mod:`laser.hooks` runs ``F.linear``
through inside ``with method:``. It saves its input through the method's saved-tensor hooks like any op, so
storage dedupe, byte accounting, the version check and the graph's lifetime are autograd's and the
method's as before; at backward the hook hands the input's codes to this call's :class:`LinearInput`
instead of decoding them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def factored_weight_grad(grad_out: torch.Tensor, codes: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``grad_W = (dY^T Z) Q^T`` for ``grad_out`` dY (N, Dout), ``codes`` Z (N, k), ``basis`` Q (Din, k).

    The small (Dout, k) product comes first: it is what ``dY^T (Z Q^T)`` costs without building the
    (N, Din) reconstruction.
    """
    return (grad_out.T @ codes) @ basis.T  # (Dout, k) @ (k, Din)


def weight_grad(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad_W = dY^T x`` from the input itself: ``grad_out`` (N, Dout), ``x`` (N, Din)."""
    return grad_out.T @ x


def aten_op(x: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The op autograd's own ``F.linear`` records for its output (what site names call the op that made a
    linear's output, so they are the same on either path): ``addmm`` with a bias, ``mm`` without; a
    bias added after a matmul of a non-contiguous input of 3 or more dimensions is ``add``; a 1-D input
    without a bias is ``squeeze``."""
    if bias is None:
        return "squeeze" if x.dim() == 1 else "mm"
    return "add" if x.dim() >= 3 and not x.is_contiguous() else "addmm"


def same_basis(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two bases are views of the same columns of one tensor (records hold their own views)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class LinearInput:
    """What one factored linear call gets back of its saved input at backward: its codes and basis, or
    nothing (the input was kept raw, and autograd hands it back as a tensor).

    The saved-tensor hook fills :attr:`factors` when it unpacks a coded input, right before the call's
    backward reads it; :meth:`take` empties it again, so the graph holds the codes only through the
    hook's own record, which autograd frees after the backward as it frees any saved tensor. :attr:`basis`
    is the basis the input was coded against when it was saved (None: raw, or not coded yet), so the next
    calls of the weight can share a :class:`WeightGradSink` for it.
    """

    __slots__ = ("factors", "basis")

    def __init__(self) -> None:
        self.factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.basis: torch.Tensor | None = None

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``(codes (N, k), basis (Din, k))`` the hook left for this backward, once."""
        factors, self.factors = self.factors, None
        return factors


class WeightGradSink(torch.autograd.Function):
    """A (Dout, k) stand-in for a weight through which the factored linears whose inputs share one basis
    ``Q`` return ``dY^T Z``: autograd sums what all of them (the recursion steps) return in this node's input,
    and its one backward turns the sum into the weight's gradient, ``(sum dY^T Z) Q^T``.

    The weight's gradient still arrives through autograd, as one more contribution to its accumulation
    (hooks, DDP's and FSDP's reducers see an ordinary gradient). The stand-in's values are never read.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        ctx.basis = basis  # held by the node, not saved: a basis is not an activation
        ctx.set_materialize_grads(False)
        return weight.new_empty(weight.shape[0], basis.shape[1])  # (Dout, k)

    @staticmethod
    def backward(ctx, summed: torch.Tensor | None):
        if summed is None:  # no step's input was coded against this basis
            return None, None
        return summed @ ctx.basis.T.to(summed.dtype), None  # (Dout, Din)


class FactoredLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` as rows (N, Dout), whose weight gradient uses the codes of ``x`` where the
    hook kept some; the caller views the rows in ``x``'s leading shape.

    The forward is ``F.linear`` of ``x``'s rows (under autocast, autocast casts the weight and bias as it
    would, from its cache); the caller casts ``x`` to autocast's dtype first, so what is saved is what the
    baseline saves. The output is the rows themselves, not a view, so the op that made a view of it later
    saved is this node, named as autograd's own linear would name it (:func:`aten_op`). The weight is saved
    only where the input needs a gradient, as autograd's own linear does (the caller routes only weights
    that need one). The backward computes in the dtype of the incoming gradient (the forward's compute
    dtype); autograd casts each gradient to its input's dtype, as autocast's casts do.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, link: LinearInput,
                bases: tuple[torch.Tensor, ...], *sinks: torch.Tensor) -> torch.Tensor:
        """``sinks``: the weight's :class:`WeightGradSink` stand-ins made so far in this forward, one per
        basis in ``bases``; the backward returns ``dY^T Z`` to the one whose basis coded the input."""
        ctx.link, ctx.op, ctx.shape, ctx.bases = link, aten_op(x, bias), x.shape, bases
        ctx.save_for_backward(x, weight if ctx.needs_input_grad[0] else None)
        return F.linear(x.reshape(-1, x.shape[-1]), weight, bias)  # (N, Dout)

    @staticmethod
    def backward(ctx, rows: torch.Tensor):
        x, weight = ctx.saved_tensors
        factors = ctx.link.take()
        grad_x = grad_w = grad_b = None
        grad_sinks = [None] * len(ctx.bases)
        if ctx.needs_input_grad[0]:
            grad_x = (rows @ weight.to(rows.dtype)).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            if factors is None:
                grad_w = weight_grad(rows, x.reshape(-1, x.shape[-1]).to(rows.dtype))
            else:
                codes, basis = factors
                sink = next((i for i, b in enumerate(ctx.bases) if same_basis(basis, b)), None)
                if sink is None:
                    grad_w = factored_weight_grad(rows.to(basis.dtype), codes, basis)
                else:  # (Dout, k), summed over the recursion steps by autograd
                    grad_sinks[sink] = rows.to(basis.dtype).T @ codes
        if ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b, None, None, *grad_sinks
