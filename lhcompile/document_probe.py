"""Which graph a batch of packed documents needs, found from a captured graph's inputs before it runs.

A rewritten graph runs Lighthouse per document with stages sized for the most long documents a batch could hold,
since a graph cannot choose its work by data without ``torch.cond`` (whose backward recomputes the forward,
BENCHMARKS.md). Two kinds of batch need less, and the backend keeps a graph for each:

- ``AS_CAPTURED``: every document is shorter than ``config.min_lighthouse_len``, so Lighthouse per document is dense
  attention within each document, which is exactly what the graph computed before the pass;
- ``ROWS``: every row is one document (of the graph's static length), so Lighthouse per document is plain Lighthouse
  on each row, the graph rewritten as for plain causal attention;
- ``DOCUMENTS``: any other batch, the rewritten graph.

The probe evaluates each per-document site's document tensors (position ids, cumulative lengths, a FlexAttention
mask's tables) from the graph's inputs, eagerly, and reads their lengths on the host (one sync per distinct set of
documents: the sites of a model share theirs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from .documents import document_lengths, longest_document
from .passes import Resolve, Site, ancestors, evaluate, source
from .passes.meta import node_device

MAX_NODES = 64
"""Most nodes evaluated per set of documents: documents come from the inputs in a few integer operations, and
anything larger would be the model's own computation."""

_OPS = ("call_function", "call_method", "get_attr", "placeholder")

AS_CAPTURED, ROWS, DOCUMENTS = "as captured", "rows", "documents"
VARIANTS = {AS_CAPTURED: ("no document long enough for Lighthouse", "as captured (dense within documents)"),
            ROWS: ("one document per row", "rewritten for plain Lighthouse on each row")}
"""What a batch that runs each graph besides the rewritten one held, and what that graph is."""


@dataclass(frozen=True)
class DocumentProbe:
    """The document tensors of a graph's per-document Lighthouse sites, as nodes to evaluate from its inputs."""

    inputs: tuple[fx.Node, ...]
    """The captured graph's placeholders, in the order of the values it is called with."""
    documents: tuple[tuple[str, tuple[fx.Node, ...], tuple[int, int] | None], ...]
    """Per distinct set of documents: its form (``lhcompile.documents.starts_of``'s), the nodes that hold it, and
    the (batch, length) of its sites where both are static (else None)."""
    resolve: Resolve
    shortest: int
    """``config.min_lighthouse_len``: a document this long runs Lighthouse."""

    @classmethod
    def of(cls, gm: fx.GraphModule, sites: Sequence[Site], lighthouse: Sequence[Site], resolve: Resolve,
           shortest: int) -> DocumentProbe | None:
        """The probe for gm, whose ``sites`` include the ``lighthouse`` ones, or None where the graph as captured
        cannot stand in for them: a Lighthouse site that is not per document, or whose documents are its whole rows
        (their length is the graph's), documents computed from anything but the graph's inputs in a few stateless
        operations, or an attention call that does not train on its device (varlen_attn on a CPU)."""
        if any(s.kind.trains_on is not None and getattr(node_device(s.q), "type", None) not in s.kind.trains_on
               for s in sites):
            return None
        inputs = tuple(n for n in gm.graph.nodes if n.op == "placeholder")
        documents: dict[tuple, tuple[str, tuple[fx.Node, ...], tuple[int, int] | None]] = {}
        for site in lighthouse:
            if site.documents is None or site.documents.form == "whole_rows":
                return None
            for node in site.documents.tensors:
                nodes, leaves = ancestors(node, resolve)
                if len(nodes) > MAX_NODES or any(leaf not in inputs for leaf in leaves) or any(
                        n.op not in _OPS or isinstance(n.target, torch._ops.HigherOrderOperator) for n in nodes):
                    return None
            key = (site.documents.form, tuple(source(n, resolve) for n in site.documents.tensors))
            batch, length = site.q_shape[0], site.q_shape[2]
            shape = (batch, length) if isinstance(batch, int) and isinstance(length, int) else None
            documents.setdefault(key, (site.documents.form, site.documents.tensors, shape))
        return cls(inputs, tuple(documents.values()), resolve, shortest) if documents else None

    @property
    def rows_known(self) -> bool:
        """Whether a batch of one document per row can be told (the sites' shapes are static): ``ROWS`` exists."""
        return all(shape is not None for _, _, shape in self.documents)

    def variant(self, args: Sequence[Any]) -> str:
        """The graph the batch the graph is called with needs: ``AS_CAPTURED``, ``ROWS`` or ``DOCUMENTS``."""
        values = dict(zip(self.inputs, args))
        found = []
        with torch.no_grad():
            for form, nodes, shape in self.documents:
                tensors = [evaluate(n, self.resolve, values) for n in nodes]
                if shape is None:
                    found.append((longest_document(form, tensors), False))
                else:
                    lengths = document_lengths(form, tensors, *shape)
                    found.append((max(lengths), len(lengths) == shape[0]))
        if all(longest < self.shortest for longest, _ in found):
            return AS_CAPTURED
        return ROWS if all(rows for _, rows in found) else DOCUMENTS

