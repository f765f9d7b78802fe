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
from typing import Any

import torch
import torch.fx as fx

from .meta import input_name, node_shape, source_name, user_path
from .values import Resolve, ancestors, evaluate, source, stateless

MAX_MASK_ENTRIES = 2**34
"""Largest mask (B * H * N * N entries) evaluated to prove causality: 16 GiB of bool at most."""

@dataclass(frozen=True)
class MaskProof:
    """Whether an explicit attn_mask is exactly the causal mask, and what the proof took on trust."""

    reason: str | None
    """None: the mask is the causal mask; else why it is not, or cannot be shown to be."""
    buffers: tuple[str, ...] = ()
    """Module buffers (user paths) whose values at capture entered the proof: taken as constants."""
    runtime: bool = False
    """The mask is computed from the graph's inputs (e.g. handed to a layer compiled on its own) in at most
    ``MAX_RUNTIME_NODES`` stateless operations: its value can be checked at each call instead (see
    ``causal_verdict``)."""


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


def prove_causal(mask: fx.Node, resolve: Resolve | None = None, proofs: Proofs | None = None) -> MaskProof:
    """Whether ``mask`` always equals the causal (lower-triangular) mask, or why it cannot be shown.

    ``proofs`` keeps the verdict per mask source, so that a mask read by every layer (in one graph, or passed
    into each checkpointed layer's body) is evaluated once, not once per layer."""
    if proofs is None:
        return _prove(mask, resolve)
    made_by = source(mask, resolve)
    if made_by not in proofs:
        proofs[made_by] = _prove(mask, resolve)
    return proofs[made_by]


def _prove(mask: fx.Node, resolve: Resolve | None) -> MaskProof:
    nodes, inputs = ancestors(mask, resolve)
    kinds: dict[str, list[str]] = {}
    for node in inputs:
        kind, name = _input_kind(node)
        kinds.setdefault(kind, []).append(name)
    if "input" in kinds:
        return MaskProof(
            f"explicit attn_mask is computed from the graph's inputs ({', '.join(kinds['input'][:3])}) at run time: "
            "a padding or packing mask, or a mask made outside this graph (a layer compiled on its own receives "
            "its mask as an input); it cannot be proven causal",
            runtime="parameter" not in kinds and len(nodes) <= MAX_RUNTIME_NODES and stateless(nodes))
    if "parameter" in kinds:
        return MaskProof(
            f"explicit attn_mask is a learned bias, computed from parameters ({', '.join(kinds['parameter'][:3])}), "
            "e.g. a relative position bias as in T5: not a causal mask")
    if not stateless(nodes):
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
        value = evaluate(mask, resolve)
    verdict = causal_verdict(value)
    return MaskProof(None, tuple(kinds.get("buffer", ()))) if verdict is None else MaskProof(verdict)


MAX_RUNTIME_NODES = 16
"""Most operations between a graph's inputs and a mask checked at each call: a mask handed to a layer is sliced or
cast at most; anything larger is the model's own mask construction."""


def causal_verdict(value: torch.Tensor) -> str | None:
    """None if an attn_mask value (bool: True attends; float: 0 attends, -inf or the dtype's min does not) is
    exactly the causal mask over its last two axes, else what it is instead."""
    shape = tuple(value.shape)
    if len(shape) < 2 or shape[-1] != shape[-2]:
        return f"explicit attn_mask of shape {shape} is not a square mask (padding, or queries other than the keys)"
    n = shape[-1]
    allowed = value if value.dtype == torch.bool else value == 0
    if value.dtype != torch.bool and not bool((value[~allowed] <= torch.finfo(value.dtype).min / 2).all()):
        return "explicit float attn_mask adds finite biases (a position bias such as ALiBi); not a pure causal mask"
    rows = max(1, 2**26 // n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        causal = torch.ones(stop - start, n, dtype=torch.bool, device=value.device).tril(start)
        part = allowed[..., start:stop, :]
        if not bool((part == causal).all()):
            return ("explicit attn_mask is not the causal mask: " + (
                "it hides keys the causal mask keeps (a sliding window, padding or packed documents)"
                if bool((part <= causal).all()) else "it shows keys after the query (not causal)"))
    return None


def constant_value(node: fx.Node, resolve: Resolve | None = None) -> Any:
    """The value of ``node`` when the graph computes it from no input at all (e.g. positions made by arange in the
    graph), without stateful operations; else None."""
    nodes, inputs = ancestors(node, resolve)
    if inputs or not stateless(nodes):
        return None
    with torch.no_grad():
        return evaluate(node, resolve)
