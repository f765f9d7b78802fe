"""lhcompile's own dense attention within documents (``lhcompile.document_attention``, the op that
``attn_implementation="causal_sdpa"`` calls for packed sequences): its documents are its ``starts`` argument.
Documents known at capture (position ids made in the graph) are evaluated there: one per row is plain causal
attention."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..causal_mask import Proofs, Resolve, constant_value
from ..meta import node_shape
from ..site import DocumentSource, SdpaLayout, Site, bind_arguments, module_path, tuple_outputs


def _target() -> Any:
    try:
        return torch.ops.lhcompile.document_attention.default
    except (AttributeError, RuntimeError):  # lhcompile.documents not imported: no such call can be in a graph
        return None


class DocumentOp(SdpaLayout):
    name = "document_attention"
    query, key, value = "q", "k", "v"
    rope = True

    def matches(self, node: fx.Node) -> bool:
        return node.op == "call_function" and node.target is _target() and node.target is not None

    def site(self, node: fx.Node, index: int, resolve: Resolve | None, proofs: Proofs) -> Site:
        args = bind_arguments(node.target, node.args, node.kwargs)
        site = Site(self, node, index, args, module_path(node), node_shape(args["q"]), node_shape(args["k"]))
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        site.extra_nodes, site.output, site.problem = tuple_outputs(node, order)
        if args.get("keep") is not None:
            site.problem = "document_attention leaves documents out (keep=...): it is part of Lighthouse already"
        starts = args["starts"]
        known = constant_value(starts, resolve) if isinstance(starts, fx.Node) else None
        if known is not None and not bool(known[:, 1:].any()):
            site.causal_proven = site.problem is None  # one document per row, known at capture
        else:
            site.documents = DocumentSource("starts", (starts,),
                                            "the documents lhcompile.document_attention is given, read at run time")
        return site

    def op_name(self, target: Any) -> str:
        return "lhcompile.document_attention"
