"""Which modules of a model are its layers, and where each attention call stands: found by running it once.

``dense_layers`` counts a model's attention sites in execution order, and a model compiled whole sees them all in
one graph. Compiled layer by layer (regional compilation, per-layer ``fully_shard``, ``block.compile()``), no graph
sees the model: which modules are the layers, how often each is called, which of them attend and where each call
stands among all of them is a fact of the model's own forward, not of its module tree (nanoGPT keeps its
embeddings in the ModuleDict that holds its layer list; Musicgen's codebook embeddings and heads are ModuleLists; a
stack may call one layer object twice; a hybrid stack attends in one layer of four). So the applied model's first
call runs its forward once more before the real one, without gradients and with every attention call answered by
zeros of the right shape (no attention is computed: at long context this costs the projections and MLPs alone),
and watches which modules are running at each attention call. The random number generators are put back
afterwards, so dropout draws what it would have drawn. What the forward changes in the model's own Python state
(a counter it keeps) it changes once more.

What it finds (``Plan``):

- the layers: per attention call, the outermost module on the call stack that is compiled on its own already
  (``fully_shard``, ``block.compile()``) inside an item of a ModuleList/ModuleDict, else (regional) the outermost
  such item; a layer is never called inside another. The other items of the same layer lists are layers too
  (compiled for speed; a hybrid stack's mixers), with no attention of their own;
- each layer call's attention sites: positions in execution order among all of the model's sites, and module
  paths. Attention the model's own code calls outside its layers keeps its positions (and runs uncompiled).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ..passes.meta import join_path, user_path


@dataclass(frozen=True)
class PlannedSite:
    """One attention call of the model's forward."""

    position: int
    """Its place among the model's attention calls, in execution order."""
    path: str
    """The module that made it (the innermost one running), as the model names it."""
    op: str
    layer: str | None
    """The path of the layer it ran in, or None: the model's own code outside its layers."""


@dataclass
class Plan:
    """What the applied model's first call found (see the module's docstring)."""

    sites: list[PlannedSite]
    layers: dict[torch.nn.Module, str]
    """The modules compiled on their own, by path: those that attend and the other items of their layer lists."""
    calls: dict[torch.nn.Module, list[tuple[int, ...]]] = field(default_factory=dict)
    """Per layer, the positions of its attention calls at each of its calls, in call order."""

    @property
    def total(self) -> int:
        return len(self.sites)

    @property
    def outside(self) -> list[PlannedSite]:
        """Attention calls of the model's own code outside its layers (when it has layers)."""
        return [s for s in self.sites if s.layer is None] if self.layers else []

    def paths(self, positions: tuple[int, ...]) -> tuple[str, ...]:
        return tuple(self.sites[p].path for p in positions)


def compiled_alone(module: torch.nn.Module) -> bool:
    """Whether the module is compiled on its own already: sharded with FSDP2 (Dynamo does not trace its hooks) or
    given its own compiled call (``Module.compile``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule) or module._compiled_call_impl is not None


def _items(model: torch.nn.Module) -> dict[torch.nn.Module, tuple[str, torch.nn.Module]]:
    """Every item of every ModuleList/ModuleDict of the model: its path, and the list that holds it."""
    items: dict[torch.nn.Module, tuple[str, torch.nn.Module]] = {}
    for path, container in model.named_modules():
        if isinstance(container, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            for name, item in container.named_children():
                items.setdefault(item, (join_path(path, name), container))
    return items


ATTENTION_NAMES = frozenset({"scaled_dot_product_attention", "flex_attention", "_varlen_attn", "varlen_attn",
                             "document_attention"})
"""The calls the pass rewrites, as a TorchFunctionMode sees them run eagerly (the SDPA builtin, FlexAttention's
higher-order op, varlen's and lhcompile's custom ops)."""


def attention_name(func: Any) -> str | None:
    """The call's name if it is one of ``ATTENTION_NAMES``, else None."""
    name = getattr(func, "__name__", "")
    name = name.removesuffix(".default")
    return name if name in ATTENTION_NAMES else None


class _Watch(TorchFunctionMode):
    """Answers every attention call with zeros shaped as its result (found on fake copies of its inputs), noting the
    modules running at each."""

    def __init__(self, running: list[tuple[torch.nn.Module, int]], seen: list) -> None:
        super().__init__()
        self.running, self.seen = running, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = attention_name(func)
        if name is None:
            return func(*args, **kwargs)
        self.seen.append((name, list(self.running)))
        with FakeTensorMode(allow_non_fake_inputs=True):
            shaped = func(*args, **kwargs)
        return tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                        if isinstance(t, torch.Tensor) else t, shaped)


@contextlib.contextmanager
def _module_stack(running: list[tuple[torch.nn.Module, int]], called: list[tuple[torch.nn.Module, int]],
                  outer: dict[int, tuple[torch.nn.Module, ...]]):
    """Keep ``running`` the modules whose forward is running (outermost first), each call numbered in ``called``,
    with the modules running around it in ``outer``."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    def enter(module, args):
        number = len(called)
        outer[number] = tuple(m for m, _ in running)
        running.append((module, number))
        called.append((module, number))

    def leave(module, args, output):
        for i in range(len(running) - 1, -1, -1):
            if running[i][0] is module:
                del running[i:]
                break

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _devices(model: torch.nn.Module, args: Any) -> list[int]:
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_cuda][:1]
    tensors += [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.is_cuda]
    return sorted({t.device.index for t in tensors})


def discover(model: torch.nn.Module, call: Callable[[], Any], regional: bool) -> Plan:
    """Run ``call`` (the model's own forward on the first call's inputs) as the module's docstring says, and make
    the plan: the layers compiled on their own, and where each attention call stands."""
    running: list[tuple[torch.nn.Module, int]] = []
    called: list[tuple[torch.nn.Module, int]] = []
    outer: dict[int, tuple[torch.nn.Module, ...]] = {}
    seen: list[tuple[str, list[tuple[torch.nn.Module, int]]]] = []
    with torch.no_grad(), torch.random.fork_rng(devices=_devices(model, ())), \
            torch.compiler.set_stance("force_eager"), _module_stack(running, called, outer), _Watch(running, seen):
        call()
    # as the user names them: without the wrappers' own names (checkpoint_wrapper's, torch.compile's, FSDP1's)
    paths = {module: user_path(path) for path, module in model.named_modules()}
    items = _items(model)
    alone = {m for m in paths if m is not model and compiled_alone(m)}

    def candidate(stack: list[tuple[torch.nn.Module, int]]) -> torch.nn.Module | None:
        inside = False
        for module, _ in stack:
            inside = inside or module in items
            if inside and module in alone:
                return module
        return next((m for m, _ in stack if m in items), None) if regional else None

    chosen = {m for _, stack in seen if (m := candidate(stack)) is not None}
    # a layer called inside another runs inside the other's call: its attention counts there
    nested = {number for module, number in called if module in chosen and chosen & set(outer[number])}
    per_call: dict[int, list[int]] = defaultdict(list)
    sites = []
    for position, (op, stack) in enumerate(seen):
        layer = next(((m, n) for m, n in stack if m in chosen and n not in nested), None)
        if layer is not None:
            per_call[layer[1]].append(position)
        sites.append(PlannedSite(position, paths.get(stack[-1][0], "") if stack else "", op,
                                 None if layer is None else paths.get(layer[0], "")))
    calls: dict[torch.nn.Module, list[tuple[int, ...]]] = defaultdict(list)
    for module, number in called:
        if module in chosen and number not in nested:
            calls[module].append(tuple(per_call.get(number, ())))
    plan = Plan(sites, {m: path for m, path in paths.items() if m in chosen}, dict(calls))  # in the model's order
    if regional:
        _add_siblings(plan, items)
    return plan


def _add_siblings(plan: Plan, items: dict[torch.nn.Module, tuple[str, torch.nn.Module]]) -> None:
    """The other items of the lists that hold layers are layers too, with no attention of their own."""
    lists = {items[m][1] for m in plan.layers if m in items}
    siblings = {item: path for item, (path, container) in items.items() if container in lists
                and item not in plan.layers and not isinstance(item, (torch.nn.ModuleList, torch.nn.ModuleDict))}
    if siblings:
        order = {path: i for i, (path, _) in enumerate(items.values())}
        layers = {**plan.layers, **siblings}
        plan.layers = dict(sorted(layers.items(), key=lambda kv: order.get(kv[1], -1)))
        for item in siblings:
            plan.calls.setdefault(item, [()])
