"""Replace SDPA calls by a subgraph built by a caller-supplied function, keeping what restore needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx

from .match import SdpaSite

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


Build = Callable[[SdpaSite, dict[str, Any]], fx.Proxy]
"""Called with a site and its bound arguments (graph values as fx.Proxy); returns the replacement's output."""


def rewrite_sdpa(gm: fx.GraphModule, sites: list[SdpaSite], build: Build) -> None:
    """Rewrite each of ``sites`` (found in gm.graph) into ``build(site, arguments)``, traced in place.

    The new nodes carry ``meta[REWRITE_TAG]``; the subgraph's output node also records the erased
    nodes (the SDPA call and its getitems), so that ``restore_sdpa`` can put them back unchanged.
    """
    graph = gm.graph
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
        for node in reversed(erased):
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
