"""Prove that an explicit SDPA attn_mask is exactly the causal mask, by evaluating the graph that builds it.

Hugging Face models traced by Dynamo on torch < 2.14 build their causal mask inside the graph instead of
passing is_causal=True, and nanoGPT-style models slice a lower-triangular buffer. Such a mask is a compile-time
constant when nothing it depends on is a graph input other than module buffers (taken at their value at
capture, and said so); it is then evaluated once and compared with the lower triangle. A mask that enters the
body of a higher-order op (an activation-checkpointed layer) as an input is followed into the enclosing graph
through ``resolve``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from .meta import input_name, lifted_tensor, node_shape, source_name, user_path

MAX_MASK_ENTRIES = 2**34
"""Largest mask (B * H * N * N entries) evaluated to prove causality: 16 GiB of bool at most."""

Resolve = Callable[[fx.Node], "fx.Node | None"]
"""Maps a placeholder of a subgraph to the node of the enclosing graph that feeds it, or None."""


_STATEFUL = {
    torch._C._set_grad_enabled,
    torch._C._functorch._vmap_increment_nesting,
    torch._C._functorch._vmap_decrement_nesting,
    torch.amp.autocast_mode._enter_autocast,
    torch.amp.autocast_mode._exit_autocast,
}


@dataclass(frozen=True)
class MaskProof:
    """Whether an explicit attn_mask is exactly the causal mask, and what the proof took on trust."""

    reason: str | None
    """None: the mask is the causal mask; else why it is not, or cannot be shown to be."""
    buffers: tuple[str, ...] = ()
    """Module buffers (user paths) whose values at capture entered the proof: taken as constants."""


Proofs = dict[fx.Node, MaskProof]
"""Proofs by the node that makes the mask: one model's layers share one mask."""


def _input_kind(node: fx.Node) -> tuple[str, str]:
    """What a graph input that Dynamo lifted is: ('parameter' | 'buffer' | 'input', the user's name for it)."""
    name = source_name(node)
    if name is None:
        return "input", node.name
    if "._parameters[" in name:
        return "parameter", user_path(name)
    if "._buffers[" in name:
        return "buffer", user_path(name)
    return "input", input_name(name)


def _ancestors(node: fx.Node, resolve: Resolve | None) -> tuple[list[fx.Node], list[fx.Node]]:
    """Every node the value of ``node`` depends on, across subgraph boundaries, and the graph inputs among them."""
    seen: set[fx.Node] = set()
    inputs: list[fx.Node] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            outer = resolve(n) if resolve is not None else None
            if outer is None:
                inputs.append(n)
            else:
                stack.append(outer)
        else:
            stack.extend(n.all_input_nodes)
    return list(seen), inputs


def _attr(module: torch.nn.Module, target: str) -> Any:
    for name in target.split("."):
        module = getattr(module, name)
    return module


def _evaluate(node: fx.Node, resolve: Resolve | None) -> Any:
    """The value of ``node``, computed from the nodes it depends on (placeholders through ``resolve``, and
    module buffers lifted by Dynamo through their value at capture)."""
    env: dict[fx.Node, Any] = {}
    stack = [node]
    while stack:
        n = stack[-1]
        outer = resolve(n) if n.op == "placeholder" and resolve is not None else None
        deps = [outer] if outer is not None else [] if n.op == "placeholder" else n.all_input_nodes
        missing = [d for d in deps if d not in env]
        if missing:
            stack.extend(missing)
            continue
        stack.pop()
        args, kwargs = fx.map_arg((n.args, n.kwargs), env.__getitem__)
        if n.op == "placeholder":
            env[n] = env[outer] if outer is not None else lifted_tensor(n)
        elif n.op == "get_attr":
            env[n] = _attr(n.graph.owning_module, n.target)
        elif n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:  # call_module
            env[n] = n.graph.owning_module.get_submodule(n.target)(*args, **kwargs)
    return env[node]


def _source(node: fx.Node, resolve: Resolve | None) -> fx.Node:
    """The node that makes the value of ``node``, followed out of the bodies it is passed into."""
    while node.op == "placeholder" and resolve is not None and (outer := resolve(node)) is not None:
        node = outer
    return node


def prove_causal(mask: fx.Node, resolve: Resolve | None = None, proofs: Proofs | None = None) -> MaskProof:
    """Whether ``mask`` always equals the causal (lower-triangular) mask, or why it cannot be shown.

    ``proofs`` keeps the verdict per mask source, so that a mask read by every layer (in one graph, or passed
    into each checkpointed layer's body) is evaluated once, not once per layer."""
    if proofs is None:
        return _prove(mask, resolve)
    source = _source(mask, resolve)
    if source not in proofs:
        proofs[source] = _prove(mask, resolve)
    return proofs[source]


def _prove(mask: fx.Node, resolve: Resolve | None) -> MaskProof:
    nodes, inputs = _ancestors(mask, resolve)
    kinds: dict[str, list[str]] = {}
    for node in inputs:
        kind, name = _input_kind(node)
        kinds.setdefault(kind, []).append(name)
    if "input" in kinds:
        return MaskProof(
            f"explicit attn_mask is computed from the graph's inputs ({', '.join(kinds['input'][:3])}) at run time: "
            "a padding or packing mask, or a mask made outside this graph (a layer compiled on its own receives "
            "its mask as an input); it cannot be proven causal")
    if "parameter" in kinds:
        return MaskProof(
            f"explicit attn_mask is a learned bias, computed from parameters ({', '.join(kinds['parameter'][:3])}), "
            "e.g. a relative position bias as in T5: not a causal mask")
    if any(n.op not in ("call_function", "call_method", "get_attr", "placeholder", "call_module")
           or n.target in _STATEFUL for n in nodes):
        return MaskProof("explicit attn_mask is built with stateful operations; cannot prove it causal")
    shape = node_shape(mask)
    if shape is None or len(shape) < 2 or shape[-1] != shape[-2]:
        return MaskProof(f"explicit attn_mask of shape {shape} is not a square mask")
    numel = 1
    for s in shape:
        numel *= s
    if numel > MAX_MASK_ENTRIES:
        return MaskProof(f"explicit attn_mask has {numel} entries (> {MAX_MASK_ENTRIES}); too large to prove causal")
    with torch.no_grad():
        value = _evaluate(mask, resolve)
    n = shape[-1]
    allowed = value if value.dtype == torch.bool else value == 0
    if value.dtype != torch.bool and not bool((value[~allowed] <= torch.finfo(value.dtype).min / 2).all()):
        return MaskProof("explicit float attn_mask adds finite biases; not a pure causal mask")
    rows = max(1, 2**26 // n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        causal = torch.ones(stop - start, n, dtype=torch.bool, device=value.device).tril(start)
        if not bool((allowed[..., start:stop, :] == causal).all()):
            return MaskProof("explicit attn_mask is not the causal mask (sliding window, packing or padding?)")
    return MaskProof(None, tuple(kinds.get("buffer", ())))


def constant_value(node: fx.Node, resolve: Resolve | None = None) -> Any:
    """The value of ``node`` when the graph computes it from no input at all (e.g. positions made by arange in the
    graph), without stateful operations; else None."""
    nodes, inputs = _ancestors(node, resolve)
    if inputs or any(n.op not in ("call_function", "call_method", "get_attr", "call_module", "placeholder")
                     or n.target in _STATEFUL for n in nodes):
        return None
    with torch.no_grad():
        return _evaluate(node, resolve)
