"""Prove that an explicit SDPA attn_mask is exactly the causal mask, by evaluating the graph that builds it.

Hugging Face models traced by Dynamo on torch < 2.14 build their causal mask inside the graph instead of
passing is_causal=True. That mask is a compile-time constant when nothing it depends on is a graph input;
it is then evaluated once and compared with the lower triangle. A mask that enters the body of a higher-order
op (an activation-checkpointed layer) as an input is followed into the enclosing graph through ``resolve``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from .meta import node_shape

MAX_MASK_ENTRIES = 2**34
"""Largest mask (B * H * N * N entries) evaluated to prove causality: 16 GiB of bool at most."""

Resolve = Callable[[fx.Node], "fx.Node | None"]
"""Maps a placeholder of a subgraph to the node of the enclosing graph that feeds it, or None."""

Proofs = dict[fx.Node, "str | None"]
"""Verdicts of ``why_mask_not_causal`` by the node that makes the mask: one model's layers share one mask."""

_STATEFUL = {
    torch._C._set_grad_enabled,
    torch._C._functorch._vmap_increment_nesting,
    torch._C._functorch._vmap_decrement_nesting,
    torch.amp.autocast_mode._enter_autocast,
    torch.amp.autocast_mode._exit_autocast,
}


def _ancestors(node: fx.Node, resolve: Resolve | None) -> tuple[list[fx.Node], list[str]]:
    """Every node the value of ``node`` depends on, across subgraph boundaries, and the graph inputs among them."""
    seen: set[fx.Node] = set()
    inputs: list[str] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            outer = resolve(n) if resolve is not None else None
            if outer is None:
                inputs.append(n.name)
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
    """The value of ``node``, computed from the nodes it depends on (placeholders through ``resolve``)."""
    env: dict[fx.Node, Any] = {}
    stack = [node]
    while stack:
        n = stack[-1]
        deps = [resolve(n)] if n.op == "placeholder" else n.all_input_nodes
        missing = [d for d in deps if d not in env]
        if missing:
            stack.extend(missing)
            continue
        stack.pop()
        args, kwargs = fx.map_arg((n.args, n.kwargs), env.__getitem__)
        if n.op == "placeholder":
            env[n] = env[deps[0]]
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


def why_mask_not_causal(mask: fx.Node, resolve: Resolve | None = None, proofs: Proofs | None = None) -> str | None:
    """None if ``mask`` always equals the causal (lower-triangular) mask, else the reason it cannot be shown.

    ``proofs`` keeps the verdict per mask source, so that a mask read by every layer (in one graph, or passed
    into each checkpointed layer's body) is evaluated once, not once per layer."""
    if proofs is None:
        return _why_not_causal(mask, resolve)
    source = _source(mask, resolve)
    if source not in proofs:
        proofs[source] = _why_not_causal(mask, resolve)
    return proofs[source]


def _why_not_causal(mask: fx.Node, resolve: Resolve | None) -> str | None:
    nodes, inputs = _ancestors(mask, resolve)
    if inputs:
        return (f"explicit attn_mask depends on graph inputs ({', '.join(inputs[:3])}): a padding mask, or a causal "
                "mask made outside this graph (as when a layer is compiled on its own)")
    if any(n.op not in ("call_function", "call_method", "get_attr", "placeholder", "call_module")
           or n.target in _STATEFUL for n in nodes):
        return "explicit attn_mask is built with stateful operations; cannot prove it causal"
    shape = node_shape(mask)
    if shape is None or len(shape) < 2 or shape[-1] != shape[-2]:
        return f"explicit attn_mask of shape {shape} is not a square mask"
    numel = 1
    for s in shape:
        numel *= s
    if numel > MAX_MASK_ENTRIES:
        return f"explicit attn_mask has {numel} entries (> {MAX_MASK_ENTRIES}); too large to prove causal"
    with torch.no_grad():
        value = _evaluate(mask, resolve)
    n = shape[-1]
    allowed = value if value.dtype == torch.bool else value == 0
    if value.dtype != torch.bool and not bool((value[~allowed] <= torch.finfo(value.dtype).min / 2).all()):
        return "explicit float attn_mask adds finite biases; not a pure causal mask"
    rows = max(1, 2**26 // n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        causal = torch.ones(stop - start, n, dtype=torch.bool, device=value.device).tril(start)
        if not bool((allowed[..., start:stop, :] == causal).all()):
            return "explicit attn_mask is not the causal mask (sliding window, packing or padding?)"
    return None
