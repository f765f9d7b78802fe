"""The inverse of the rewrite: put back the exact attention calls that the rewrite replaced."""

from __future__ import annotations

import torch.fx as fx

from .rewrite import REWRITE_TAG


def restore_sites(gm: fx.GraphModule) -> int:
    """Replace every rewritten subgraph of gm, and of the graphs nested in it, by the nodes it replaced;
    returns how many were restored.

    Each graph is rebuilt node by node so that the restored nodes get back their original names: the result
    is the graph before the rewrite, node for node (names, targets, args, kwargs, order).
    """
    return sum(_restore_graph(module) for module in gm.modules() if isinstance(module, fx.GraphModule))


def _restore_graph(gm: fx.GraphModule) -> int:
    old = gm.graph
    outputs = {n.meta[REWRITE_TAG]["site"]: n for n in old.nodes if "original" in n.meta.get(REWRITE_TAG, {})}
    if not outputs:
        return 0
    new = fx.Graph(owning_module=gm, tracer_cls=old._tracer_cls, tracer_extras=old._tracer_extras)
    new._codegen = old._codegen
    env: dict[fx.Node, fx.Node] = {}
    done: set[int] = set()
    for node in old.nodes:
        tag = node.meta.get(REWRITE_TAG)
        if tag is None:
            env[node] = new.node_copy(node, lambda n: env[n])
            continue
        site = tag["site"]
        if site in done:
            continue
        done.add(site)
        info = outputs[site].meta[REWRITE_TAG]
        for rec in info["original"]:
            args = fx.map_arg(rec.args, lambda n: env[n])
            kwargs = fx.map_arg(rec.kwargs, lambda n: env[n])
            env[rec.node] = new.create_node(rec.op, rec.target, args, kwargs, name=rec.name, type_expr=rec.type)
            env[rec.node].meta = rec.meta
        env[outputs[site]] = env[info["result"]]
    new.lint()
    gm.graph = new
    gm.recompile()
    return len(outputs)
