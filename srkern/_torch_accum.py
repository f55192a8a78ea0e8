"""Gradient accumulation over micro-batches into BF16 / FP16 ``.grad`` with stochastic rounding:
``srkern.torch.sr_grad_accumulation``.

Why: autograd adds each micro-batch's gradient into an existing ``.grad`` in that tensor's dtype,
rounding to nearest; a BF16 ``.grad`` keeps 8 significant bits, so once it is large against one
micro-batch's contribution, the contribution is rounded away (64 micro-batches of a gradient
below half an ulp of the running sum add nothing at all). With this helper the sum is formed in
FP32 and written back with SR (``srkern.add_``), unbiased: the expectation of the accumulated
``.grad`` is the exact sum.

How: one pre-hook per parameter on its ``AccumulateGrad`` node does the whole addition in place
into the existing ``.grad`` and hands autograd ``None`` instead of the gradient, so autograd adds
nothing (torch/csrc/autograd/functions/accumulate_grad.cpp: an undefined input makes it return
without touching ``.grad``, and post-accumulate hooks still run; tested on torch 2.13). Nothing
is ever moved aside, so ``.grad`` is the running sum at every point: an exception anywhere in a
backward leaves it as autograd would (with or without this micro-batch), and other
post-accumulate hooks see the sum. A post-accumulate hook of ours only checks that the node we
hooked is still the parameter's (``.to(dtype/device)`` replaces it).
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _contract
from .accum import add_
from .layout import flat_offsets

SR_DTYPES = (torch.bfloat16, torch.float16)
# parameter -> weakref to the live handle hooking it. A weak value: a strong one would keep the
# handle, hence (through handle.params) the key itself, alive for ever.
_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_WHO = "srkern.torch.sr_grad_accumulation"


class SRGradAccumulation:
    """The hooks of :func:`sr_grad_accumulation` on a list of parameters; ``.remove()`` takes them
    off (also on leaving a ``with`` block, or when the handle is garbage-collected). Attributes:
    ``params`` (the hooked parameters, in flat order), ``offsets`` (each one's logical offset),
    ``seed``, ``steps`` (per parameter, how many SR additions it has had: the ``step`` of its
    next one)."""

    def __init__(self, params: list[torch.Tensor], seed: int) -> None:
        self.params = params
        self.seed = seed
        self.offsets = flat_offsets([p.numel() for p in params])
        self.steps = [0] * len(params)
        handles: list[Any] = []
        # The AccumulateGrad nodes, kept alive here: a node's pre-hooks live on the node, and a
        # leaf holds its accumulator only weakly (DDP keeps its references for the same reason).
        self._nodes = [_grad_accumulator(p) for p in params]
        # The hooks reach the handle through a weak reference only: the node holds its hooks and
        # is held by the handle, a cycle through C++ that Python's GC cannot see, so a strong one
        # would keep hooks, parameters and gradients alive after the last user reference is gone.
        # The finalizer takes the hooks off when the handle dies (or on remove()).
        ref = weakref.ref(self)
        self._finalizer = weakref.finalize(self, _remove_hooks, handles)
        self._finalizer.atexit = False
        for i, (p, node) in enumerate(zip(params, self._nodes)):
            handles.append(node.register_prehook(_pre_hook(ref, i)))
            handles.append(p.register_post_accumulate_grad_hook(_post_hook(ref, i)))
            _HOOKED[p] = ref

    def _add(self, i: int, acc: torch.Tensor, g: torch.Tensor) -> None:
        """``acc += g`` with SR, the ``steps[i]``-th addition into params[i]; every check before
        the write, so a refused call leaves ``acc`` and ``steps`` as they were."""
        p = self.params[i]
        if acc.layout != torch.strided or g.layout != torch.strided:
            raise TypeError(f"{_WHO}: params[{i}] has a sparse gradient; SR accumulation needs dense "
                            "gradients (remove the hooks for it)")
        if acc.dtype != p.dtype or acc.device != p.device:
            raise RuntimeError(f"{_WHO}: params[{i}].grad is {acc.dtype} on {acc.device}, the parameter "
                               f"{p.dtype} on {p.device}; re-create the handle after moving the model")
        contiguous = acc.is_contiguous()
        if not contiguous and not _non_overlapping(acc):
            raise ValueError(f"{_WHO}: params[{i}].grad has elements that may share memory (e.g. an "
                             "expand()ed tensor): SR cannot accumulate into it in place; give it "
                             "memory of its own (e.g. p.grad = p.grad.clone())")
        step = self.steps[i]
        if step >= _contract.U32:
            raise RuntimeError(f"params[{i}] has had 2**32 SR accumulations under seed {self.seed}: the "
                               "step word would repeat; make a new sr_grad_accumulation with another seed")
        kw = dict(seed=self.seed, offset=self.offsets[i], step=step)
        with torch.no_grad():
            if contiguous:
                add_(acc, g, **kw)
            else:
                # add_ takes a C-contiguous acc. A .grad in the parameter's (e.g. transposed)
                # layout is summed in a C-order copy, logical index = C-order position as
                # add_ defines it, and copied back: the copy-back is exact (same dtype), so the
                # bits are add_'s, never round-to-nearest; the .grad object stays the same.
                dense = acc.contiguous()
                add_(dense, g, **kw)
                acc.copy_(dense)
        self.steps[i] = step + 1

    # -- handle ------------------------------------------------------------------------------------

    def remove(self) -> None:
        """Take the hooks off (idempotent); autograd accumulates with round-to-nearest again.
        ``.grad`` is left as it is (it always holds the running sum)."""
        self._finalizer()
        for p in self.params:
            r = _HOOKED.get(p)
            if r is not None and r() is self:
                del _HOOKED[p]
        self._nodes = []

    def __enter__(self) -> "SRGradAccumulation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def state_dict(self) -> dict[str, Any]:
        """``{"seed", "steps"}``: what a resumed run needs to draw no bits twice."""
        return {"seed": self.seed, "steps": list(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``seed`` and ``steps``; a bad ``state`` raises and changes neither."""
        steps = state.get("steps")
        if not isinstance(steps, (list, tuple)) or len(steps) != len(self.params):
            raise ValueError(f"state['steps'] must list {len(self.params)} step counts, one per hooked parameter")
        seed = _contract.check_u64("state['seed']", state.get("seed"))
        steps = [_contract.check_u64(f"state['steps'][{i}]", s, _contract.U32 + 1) for i, s in enumerate(steps)]
        self.seed, self.steps = seed, steps


# -- the two hooks of parameter i (module level: they hold the handle weakly) -----------------------

def _pre_hook(ref: "weakref.ref[SRGradAccumulation]", i: int):
    def hook(grad_outputs):
        # Runs when autograd's AccumulateGrad for params[i] is about to write .grad, after the
        # parameter's tensor hooks (register_hook), with the gradient they produced (not for
        # torch.autograd.grad, which captures gradients without running the node).
        self = ref()
        if self is None:
            return None
        if torch.is_grad_enabled():
            raise RuntimeError(f"{_WHO}: backward(create_graph=True) is not supported (the SR addition "
                               "is invisible to autograd); remove the hooks first")
        g = grad_outputs[0]
        acc = self.params[i].grad
        if g is None or acc is None:
            # No gradient this backward (e.g. a custom Function's backward returned None):
            # autograd leaves .grad alone. No .grad yet (the first micro-batch): autograd assigns
            # this gradient as it is, nothing to round.
            return None
        self._add(i, acc, g)
        return (None,)  # added already: AccumulateGrad gets no gradient and writes nothing
    return hook


def _post_hook(ref: "weakref.ref[SRGradAccumulation]", i: int):
    def hook(p: torch.Tensor) -> None:
        # Post-accumulate hooks live on the tensor and survive p.data = ... (what
        # module.to(dtype/device) does), which gives p a new AccumulateGrad node without our
        # pre-hook: autograd has just added this micro-batch with round-to-nearest. Say so.
        # The identity check costs ~4 us per parameter and backward (CPU, torch 2.13).
        self = ref()
        if self is not None and self._nodes and _grad_accumulator(p) is not self._nodes[i]:
            raise RuntimeError(f"{_WHO}: params[{i}] was moved or cast (module.to(), .data = ...) after "
                               "the hooks were made: its gradient accumulator is new and unhooked, so "
                               "this backward accumulated with round-to-nearest; remove() the handle "
                               "and create a new one after moving the model")
    return hook


def _remove_hooks(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


def _non_overlapping(t: torch.Tensor) -> bool:
    """True when, sorted by stride, each dimension's stride is at least the extent of the ones
    below it: then no two elements share memory. Sufficient, not necessary (some as_strided
    layouts are disjoint yet fail it); ``_add`` refuses what fails it rather than guess."""
    extent = 1
    for stride, size in sorted((abs(st), s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride < extent:
            return False
        extent = stride * size
    return True


def _grad_accumulator(p: torch.Tensor):
    get_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    if get_edge is not None:
        return get_edge(p).node
    with torch.enable_grad():  # torch < 2.2; also called from a hook, where grad mode is off
        return p.view_as(p).grad_fn.next_functions[0][0]


def sr_grad_accumulation(params_or_module: torch.nn.Module | Iterable[torch.Tensor], *,
                         seed: int | None = None) -> SRGradAccumulation:
    """Make autograd's accumulation of gradients into existing BF16 / FP16 ``.grad`` tensors use
    stochastic rounding (``srkern.add_``) instead of round-to-nearest.

    How it hooks in (eager autograd, PyTorch >= 2.1): for each parameter, a pre-hook on its
    ``AccumulateGrad`` node, which autograd runs just before it writes ``.grad`` (after the
    parameter's own ``register_hook`` hooks), adds the micro-batch's gradient into the existing
    ``.grad`` in place (the sum in FP32, written back with SR) and passes ``None`` on, so that
    autograd adds nothing. ``.grad`` is the same tensor object throughout and holds the running
    sum at every point: other ``register_post_accumulate_grad_hook`` hooks see the sum, and an
    exception anywhere in a backward leaves ``.grad`` as plain autograd would. The first
    micro-batch after ``zero_grad()`` (``.grad`` is None) is assigned by autograd as usual; after
    ``zero_grad(set_to_none=False)`` its zeros are the running sum (0 + g is exact). A parameter
    that gets no gradient in a backward (unused, or a ``None`` from a custom Function) is not
    touched. Gradients computed with ``torch.autograd.grad`` (which writes no ``.grad``) are not
    affected. A ``.grad`` that is not C-contiguous (a transposed parameter's) is summed in a
    C-order copy and copied back, bit-exact; one whose elements share memory is refused. Node
    pre-hooks registered on the same node after these see ``None``.

    Moving or casting the model (``model.to(...)``, ``p.data = ...`` with another dtype or
    device) gives each parameter a new ``AccumulateGrad`` node, without the hook: the next
    backward raises a RuntimeError (after autograd has accumulated that micro-batch to nearest);
    ``remove()`` the handle and make a new one after moving the model. Concurrent backward passes
    into the same parameters (threads) are not supported.

    Random bits (contract v1.1, stream ``accum``): the hooked parameters are laid out in order
    in one flat vector (``offsets``: the cumulative sizes), and the ``k``-th SR addition into
    parameter ``i`` (``k = 0, 1, ...``, counted from this call, across optimizer steps) is exactly
    ``srkern.add_(grad, g, seed=seed, offset=offsets[i], step=k)``: the same seed and the same
    sequence of backward passes give the same bits, and no (seed, step, index) is drawn twice.
    ``state_dict()`` / ``load_state_dict()`` carry the counts over a restart.

    Args:
        params_or_module: an ``nn.Module`` (its ``parameters()``) or an iterable of tensors. Leaf
            tensors that require grad and are BF16 or FP16 are hooked; FP32 (and other) ones
            are left to autograd, whose FP32 accumulation loses nothing at this scale.
            Duplicates count once; a non-leaf tensor is a ValueError, as is a parameter that
            another live handle hooks, or no BF16/FP16 parameter at all.
        seed: 64-bit Philox key; ``None`` draws one from :func:`srkern.manual_seed`'s generator.

    Returns:
        an :class:`SRGradAccumulation` handle: ``.remove()`` takes the hooks off; as a context
        manager it removes them on exit; a handle that is garbage-collected takes them off too
        (keep a reference while accumulating). ``backward(create_graph=True)`` is refused while
        hooked.

    Example::

        with srkern.torch.sr_grad_accumulation(model, seed=0):
            for x in micro_batches:
                model(x).float().mean().backward()   # .grad accumulates with SR
            opt.step(); opt.zero_grad()
    """
    if isinstance(params_or_module, torch.nn.Module):
        tensors = list(params_or_module.parameters())
    elif isinstance(params_or_module, torch.Tensor):
        tensors = [params_or_module]
    else:
        tensors = list(params_or_module)
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    for i, p in enumerate(tensors):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor")
        if id(p) in seen or not p.requires_grad or p.dtype not in SR_DTYPES:
            continue
        if not p.is_leaf:
            raise ValueError(f"params[{i}] is not a leaf tensor: autograd writes .grad only for leaves")
        owner = _HOOKED.get(p)
        if owner is not None and owner() is not None:
            raise ValueError(f"params[{i}] is already hooked by another sr_grad_accumulation; remove() it first")
        seen.add(id(p))
        params.append(p)
    if not params:
        raise ValueError("no BF16 or FP16 leaf tensor that requires grad among the parameters: nothing to hook")
    return SRGradAccumulation(params, _contract.resolve_seed(seed))
