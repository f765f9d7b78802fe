"""Prove that an explicit SDPA attn_mask is exactly the causal mask, by evaluating the graph that builds it.

Hugging Face models traced by Dynamo on torch < 2.14 build their causal mask inside the graph instead of
passing is_causal=True. That mask is a compile-time constant when nothing it depends on is a graph input;
it is then evaluated once and compared with the lower triangle.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .meta import node_shape

MAX_MASK_ENTRIES = 2**34
"""Largest mask (B * H * N * N entries) evaluated to prove causality: 16 GiB of bool at most."""

_STATEFUL = {
    torch._C._set_grad_enabled,
    torch._C._functorch._vmap_increment_nesting,
    torch._C._functorch._vmap_decrement_nesting,
    torch.amp.autocast_mode._enter_autocast,
    torch.amp.autocast_mode._exit_autocast,
}


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def why_mask_not_causal(gm: fx.GraphModule, mask: fx.Node) -> str | None:
    """None if ``mask`` always equals the causal (lower-triangular) mask, else the reason it cannot be shown."""
    nodes = _ancestors(mask)
    inputs = [n.name for n in nodes if n.op == "placeholder"]
    if inputs:
        return (f"explicit attn_mask depends on graph inputs ({', '.join(inputs[:3])}): a padding mask, or a causal "
                "mask made outside this graph (as when a layer is compiled on its own); have the model call SDPA "
                "with is_causal=True instead (Hugging Face: attn_implementation='causal_sdpa', lhcompile.hf)")
    if any(n.op not in ("call_function", "call_method", "get_attr") or n.target in _STATEFUL for n in nodes):
        return "explicit attn_mask is built with stateful operations; cannot prove it causal"
    shape = node_shape(mask)
    if shape is None or len(shape) < 2 or shape[-1] != shape[-2]:
        return f"explicit attn_mask of shape {shape} is not a square mask"
    numel = 1
    for s in shape:
        numel *= s
    if numel > MAX_MASK_ENTRIES:
        return f"explicit attn_mask has {numel} entries (> {MAX_MASK_ENTRIES}); too large to prove causal"
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[mask])
    with torch.no_grad():
        value = fx.GraphModule(gm, sub)()
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
