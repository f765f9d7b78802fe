"""The values of graph nodes computed outside the graph: at capture (a mask made from constants and module
buffers) or at run time from the graph's own inputs (the documents of a batch, before the graph runs)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from .meta import lifted_tensor

Resolve = Callable[[fx.Node], "fx.Node | None"]
"""Maps a placeholder of a subgraph to the node of the enclosing graph that feeds it, or None."""


STATEFUL = {
    torch._C._set_grad_enabled,
    torch._C._functorch._vmap_increment_nesting,
    torch._C._functorch._vmap_decrement_nesting,
    torch.amp.autocast_mode._enter_autocast,
    torch.amp.autocast_mode._exit_autocast,
}


def ancestors(node: fx.Node, resolve: Resolve | None) -> tuple[list[fx.Node], list[fx.Node]]:
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


def source(node: fx.Node, resolve: Resolve | None) -> fx.Node:
    """The node that makes the value of ``node``, followed out of the bodies it is passed into."""
    while node.op == "placeholder" and resolve is not None and (outer := resolve(node)) is not None:
        node = outer
    return node


class ValueNumbers:
    """Value numbering over a graph and its bodies: two nodes get the same number when they compute the same value
    the same way from the graph's inputs, such as each layer's own copy of a mask made from the same input."""

    def __init__(self, resolve: Resolve | None) -> None:
        self.resolve = resolve
        self._numbers: dict[tuple, int] = {}
        self._of: dict[fx.Node, int] = {}

    def __call__(self, node: fx.Node) -> int:
        node = source(node, self.resolve)
        if node not in self._of:
            if node.op == "placeholder":
                key: tuple = (node,)
            else:
                args = fx.map_arg((node.args, node.kwargs), self)
                key = (node.op, str(node.target), repr(args))
            self._of[node] = self._numbers.setdefault(key, len(self._numbers))
        return self._of[node]


def stateless(nodes: list[fx.Node]) -> bool:
    """Whether these nodes compute values only: no grad-mode, vmap or autocast switch."""
    return all(n.op in ("call_function", "call_method", "get_attr", "call_module", "placeholder")
               and n.target not in STATEFUL for n in nodes)


def _attr(module: torch.nn.Module, target: str) -> Any:
    for name in target.split("."):
        module = getattr(module, name)
    return module


def evaluate(node: fx.Node, resolve: Resolve | None, inputs: dict[fx.Node, Any] | None = None) -> Any:
    """The value of ``node``, computed from the nodes it depends on: placeholders through ``resolve``, the
    outermost graph's through ``inputs`` where given (the values it is called with), else module buffers lifted by
    Dynamo through their value at capture."""
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
            env[n] = env[outer] if outer is not None else inputs[n] if inputs is not None else lifted_tensor(n)
        elif n.op == "get_attr":
            env[n] = _attr(n.graph.owning_module, n.target)
        elif n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:  # call_module
            env[n] = n.graph.owning_module.get_submodule(n.target)(*args, **kwargs)
    return env[node]
