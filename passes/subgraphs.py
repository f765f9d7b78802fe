"""The graphs nested in a graph: bodies of higher-order ops (activation checkpointing, invoke_subgraph, ...).

Dynamo puts the code of an activation-checkpointed layer (``torch.utils.checkpoint``, Hugging Face's
gradient checkpointing, torchtitan's AC) into a ``tag_activation_checkpoint`` call whose first argument is a
``get_attr`` of the body GraphModule, followed by the body's inputs in the order of its placeholders;
``invoke_subgraph`` (nested compile regions) and Dynamo's other ``wrap`` ops have the same shape, with a
string identifier before the inputs in invoke_subgraph's case.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx


@dataclass(frozen=True)
class Subgraph:
    """One higher-order-op call of a graph and the body it runs."""

    call: fx.Node
    name: str
    """Attribute of the enclosing GraphModule that holds the body."""
    body_at: int
    """Position of the body's get_attr among the call's arguments; the body's inputs follow it."""
    module: fx.GraphModule
    inputs: dict[fx.Node, fx.Node] | None
    """Body placeholder -> node of the enclosing graph that feeds it (None when the call's arguments do not line
    up with the placeholders one for one)."""

    @property
    def op(self) -> str:
        return getattr(self.call.target, "__name__", str(self.call.target))


def subgraph_calls(gm: fx.GraphModule) -> list[Subgraph]:
    """Every higher-order-op call of gm whose argument is one of gm's GraphModule attributes, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        for i, arg in enumerate(node.args):
            if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                continue
            body = getattr(gm, arg.target, None)
            if not isinstance(body, fx.GraphModule):
                continue
            placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
            operands = [a for a in node.args[i + 1 :] if isinstance(a, fx.Node)]
            inputs = dict(zip(placeholders, operands)) if len(operands) == len(placeholders) else None
            found.append(Subgraph(node, arg.target, i, body, inputs))
    return found


def prune_unused_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    """Drop the body inputs that nothing reads any more (e.g. a causal mask that only rewritten sites read) from
    every body called once, and from its call, so that the enclosing graph can drop what computed them; returns
    the nodes that fed them (see ``erase_unused``)."""
    dropped: list[fx.Node] = []
    calls = subgraph_calls(gm)
    uses = Counter(call.name for call in calls)
    for call in calls:
        if call.inputs is None or uses[call.name] != 1:
            continue
        dropped += prune_unused_inputs(call.module)
        placeholders = list(call.inputs)
        unused = {i for i, p in enumerate(placeholders) if not p.users}
        if not unused:
            continue
        kept, operand = list(call.call.args[: call.body_at + 1]), 0
        for arg in call.call.args[call.body_at + 1 :]:
            if isinstance(arg, fx.Node):
                operand += 1
                if operand - 1 in unused:
                    continue
            kept.append(arg)
        call.call.args = tuple(kept)
        for i in sorted(unused):
            dropped.append(call.inputs[placeholders[i]])
            call.module.graph.erase_node(placeholders[i])
        call.module.recompile()
        gm.recompile()
    return dropped


def copy_with_bodies(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of gm whose graph, and the graph of every body it holds (at any depth), are its own, so that rewriting
    one leaves the other as it was. Node metadata (shallow), parameters, buffers and constants are shared."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)
    copied.meta = dict(gm.meta)
    for name, child in gm.named_children():
        if isinstance(child, fx.GraphModule):
            setattr(copied, name, copy_with_bodies(child))
    return copied
