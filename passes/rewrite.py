"""Replace attention calls by a subgraph built by a caller-supplied function, keeping what restore needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx

from .site import Site

REWRITE_TAG = "lhcompile"
"""node.meta key on every node of a rewritten subgraph: {"site": int, and on the output node "original"}."""

METADATA_TO_PORT = ("nn_module_stack", "stack_trace", "source_fn_stack")
"""Node metadata each replacement node inherits from the SDPA call it replaces (as torchao's pt2e ports it), so
that inspection, Inductor's provenance, profiler names and error messages still point at the user's module."""


@dataclass(frozen=True)
class NodeRecord:
    """Everything needed to recreate an erased node exactly (the Node object itself keys its uses)."""

    node: fx.Node
    op: str
    target: Any
    args: tuple
    kwargs: dict
    name: str
    type: Any
    meta: dict


def _record(node: fx.Node) -> NodeRecord:
    return NodeRecord(node, node.op, node.target, node.args, dict(node.kwargs), node.name, node.type, node.meta)


Build = Callable[[Site, dict[str, Any]], fx.Proxy]
"""Called with a site and its bound arguments (graph values as fx.Proxy); returns the replacement's output."""


def rewrite_sites(gm: fx.GraphModule, sites: list[Site], build: Build) -> list[fx.Node]:
    """Rewrite each of ``sites`` (attention calls found in gm.graph) into ``build(site, arguments)``, traced in
    place; returns the nodes the erased calls read (a causal mask among them may now be unused: see
    ``erase_unused``).

    The new nodes carry ``meta[REWRITE_TAG]``; the subgraph's output node also records the erased
    nodes (the attention call and its getitems), so that ``restore_sites`` can put them back unchanged.
    """
    graph = gm.graph
    read: list[fx.Node] = []
    for site in sites:
        before = set(graph.nodes)
        tracer = fx.proxy.GraphAppendingTracer(graph)
        with graph.inserting_before(site.node):
            args = fx.map_arg(site.args, lambda n: fx.Proxy(n, tracer))
            out = build(site, args).node
        for node in graph.nodes:
            if node not in before:
                node.meta[REWRITE_TAG] = {"site": site.index}
                node.meta.update({key: site.node.meta[key] for key in METADATA_TO_PORT if key in site.node.meta})
        erased = [site.node, *site.extra_nodes]
        out.meta[REWRITE_TAG]["original"] = [_record(n) for n in erased]
        out.meta[REWRITE_TAG]["result"] = site.output
        site.output.replace_all_uses_with(out)
        read.extend(site.node.all_input_nodes)
        for node in reversed(erased):
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return read


def erase_unused(nodes: list[fx.Node]) -> int:
    """Erase those of ``nodes`` that nothing reads any more, then whatever only they read, and so on; never a
    placeholder or an impure node (graph-wide dead-code elimination would drop e.g. functorch's vmap nesting
    calls, whose results nobody reads). Returns how many nodes went."""
    erased: set[fx.Node] = set()  # a mask read by several calls comes more than once
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in erased or node.users or node.op in ("placeholder", "output") or node.is_impure():
            continue
        stack.extend(node.all_input_nodes)
        node.graph.erase_node(node)
        erased.add(node)
    for module in {node.graph.owning_module for node in erased}:
        module.recompile()
    return len(erased)
