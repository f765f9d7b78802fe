"""The kinds of attention call the pass rewrites, side by side: each matches its calls and normalizes them into
one ``Site`` (its arguments, SDPA-layout inputs, output and documents). Adding a kind is adding an entry here."""

from __future__ import annotations

import re

import torch.fx as fx

from ..causal_mask import Proofs, Resolve
from ..site import Site, SiteKind
from ..subgraphs import subgraph_calls
from .document_op import DocumentOp
from .flex import Flex
from .sdpa import SDPA_PARAMS, SDPA_TARGETS, Sdpa
from .varlen import Varlen

KINDS: tuple[SiteKind, ...] = (Sdpa(), Varlen(), Flex(), DocumentOp())


def kind_of(node: fx.Node) -> SiteKind | None:
    return next((kind for kind in KINDS if kind.matches(node)), None)


def find_sites(graph: fx.Graph, resolve: Resolve | None = None, proofs: Proofs | None = None) -> list[Site]:
    """Every attention call of the graph, of every kind, in graph order, with the reason it can never be
    rewritten (if any).

    ``resolve`` maps a placeholder of ``graph`` to the node of an enclosing graph that feeds it (when the graph
    is the body of a higher-order op), so that a mask made outside can still be proven causal; ``proofs`` shares
    the masks already proven (or not) with the other graphs of one capture."""
    proofs = {} if proofs is None else proofs
    sites: list[Site] = []
    for node in graph.nodes:
        kind = kind_of(node)
        if kind is not None:
            sites.append(kind.site(node, len(sites), resolve, proofs))
    return sites


def count_sites(gm: fx.GraphModule) -> int:
    """Attention calls in gm and in the bodies nested in it (each body once, as the pass numbers them)."""
    bodies = {call.name: call.module for call in subgraph_calls(gm)}
    return sum(kind_of(node) is not None for node in gm.graph.nodes) + sum(map(count_sites, bodies.values()))


_ATTENTION_WORDS = re.compile(r"attention|attn|softmax", re.IGNORECASE)


def attention_like_calls(graph: fx.Graph) -> list[str]:
    """Names of the calls of a graph that look like attention but are of no kind the pass knows."""
    names = []
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and kind_of(node) is None:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            if _ATTENTION_WORDS.search(str(name)):
                names.append(str(name))
    return names


__all__ = ["KINDS", "SDPA_PARAMS", "SDPA_TARGETS", "attention_like_calls", "count_sites", "find_sites", "kind_of"]
