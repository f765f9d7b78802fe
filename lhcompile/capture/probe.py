"""What a batch needs, read from a captured graph's inputs before the graph runs.

- ``DocumentProbe``: which graph a batch of packed documents needs (``lhcompile.rewrite.batches``): it evaluates each
  per-document site's document tensors (position ids, cumulative lengths, a FlexAttention mask's tables) from the
  graph's inputs, eagerly, and reads their lengths on the host (one sync per distinct set of documents: the sites of
  a model share theirs), except where the call's own arguments bound its documents' lengths below
  ``config.min_lighthouse_len`` (varlen's ``max_q``, a host int) and there is no ``ON_DOCUMENT_ATTENTION`` graph to
  choose (that choice reads the lengths: ``PLANNER.cudnn_share``, the share of their work in cuDNN batches);
- ``MaskProbe``: whether the masks a graph's sites are handed (an explicit SDPA mask, a FlexAttention block mask's
  sparsity) say what each site was decided to attend.

Within one call of an applied model (``lhcompile.capture.calls.Batch``) the layers' graphs share what the first one
read, while they are handed the very same input tensors; nothing read in one model call serves another.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..operator.documents import (DENSE_SHARE, PLANNER, document_lengths, longest_document, runs_kernels,
                                  starts_of)
from ..passes import Resolve, Site, ValueNumbers, ancestors, causal_verdict, evaluate, source
from ..passes.meta import node_device, node_dtype
from ..rewrite.batches import AS_CAPTURED, DOCUMENTS, ON_DOCUMENT_ATTENTION, ROWS
from .calls import current_batch

MAX_NODES = 64
"""Most nodes evaluated per set of documents: documents come from the inputs in a few integer operations, and
anything larger would be the model's own computation."""

_OPS = ("call_function", "call_method", "get_attr", "placeholder")

@dataclass(frozen=True)
class _DocumentSet:
    """One set of documents that per-document sites of a graph share, as nodes to evaluate from its inputs."""

    form: str
    """``lhcompile.documents.starts_of``'s form."""
    tensors: tuple[fx.Node, ...]
    shape: tuple[int, int] | None
    """The (batch, length) of its sites where both are static, else None."""
    bound: fx.Node | int | None
    """A graph input or constant at least as long as its longest document (``passes.DocumentSource.longest``)."""


class DocumentProbe:
    """The document tensors of a graph's per-document Lighthouse sites, as nodes to evaluate from its inputs.

    A model's layers hand each of their calls the same document tensors (one per batch, made by the data pipeline
    or the trainer), so within one call of the model (``lhcompile.calls.Batch``) the first graph's answer serves
    every later graph handed the very same tensors (same objects, version counters and storage): the layers read
    the documents once per step, not once per layer. Nothing is kept from one model call to the next, so a batch
    written into the last one's tensors by any means is read anew."""

    def __init__(self, inputs: tuple[fx.Node, ...], documents: tuple[_DocumentSet, ...], resolve: Resolve,
                 shortest: int, dense: bool) -> None:
        self.inputs = inputs
        """The captured graph's placeholders, in the order of the values it is called with."""
        self.documents = documents
        self.resolve = resolve
        self.shortest = shortest
        """``config.min_lighthouse_len``: a document this long runs Lighthouse."""
        self.dense = dense and self.rows_known
        """Whether a batch without a long document may run the ``ON_DOCUMENT_ATTENTION`` graph (its documents' lengths are read)."""
        leaves = {leaf for d in documents for node in (*d.tensors, d.bound) if isinstance(node, fx.Node)
                  for leaf in ancestors(node, resolve)[1]}
        self._leaves = [i for i, node in enumerate(inputs) if node in leaves]
        self._question = (shortest, self.dense, tuple(_signature(d, resolve) for d in documents))
        """What the answer depends on besides the inputs' values: graphs whose probes ask the same share it."""

    @classmethod
    def of(cls, gm: fx.GraphModule, sites: Sequence[Site], lighthouse: Sequence[Site], resolve: Resolve,
           shortest: int, dense: bool) -> DocumentProbe | None:
        """The probe for gm, whose ``sites`` include the ``lighthouse`` ones, or None where the graph as captured
        cannot stand in for them: a Lighthouse site that is not per document, or whose documents are its whole rows
        (their length is the graph's), documents computed from anything but the graph's inputs in a few stateless
        operations, or an attention call that does not train on its device (varlen_attn on a CPU). ``dense``: the
        placement can run ``ON_DOCUMENT_ATTENTION``, which the probe then chooses where every Lighthouse site is a model's own
        kernel (not already ``document_attention``) where ``document_attention`` runs its GPU kernels
        (``documents.runs_kernels``: elsewhere it is a reference, never the faster)."""
        if any(s.kind.trains_on is not None and getattr(node_device(s.q), "type", None) not in s.kind.trains_on
               for s in sites):
            return None
        inputs = tuple(n for n in gm.graph.nodes if n.op == "placeholder")
        documents: dict[tuple, _DocumentSet] = {}
        numbers = ValueNumbers(resolve)  # layers that each compute the documents anew from one input share them
        for site in lighthouse:
            if site.documents is None or site.documents.form == "whole_rows":
                return None
            for node in site.documents.tensors:
                nodes, leaves = ancestors(node, resolve)
                if len(nodes) > MAX_NODES or any(leaf not in inputs for leaf in leaves) or any(
                        n.op not in _OPS or isinstance(n.target, torch._ops.HigherOrderOperator) for n in nodes):
                    return None
            key = (site.documents.form, tuple(numbers(n) for n in site.documents.tensors))
            batch, length = site.q_shape[0], site.q_shape[2]
            shape = (batch, length) if isinstance(batch, int) and isinstance(length, int) else None
            bound = site.documents.longest
            if isinstance(bound, fx.Node):
                bound = source(bound, resolve)
                bound = bound if bound in inputs else None
            elif not isinstance(bound, int):
                bound = None
            documents.setdefault(key, _DocumentSet(site.documents.form, site.documents.tensors, shape, bound))
        dense = dense and all(s.kind.name != "document_attention" and runs_kernels(node_device(s.q), node_dtype(s.q))
                              for s in lighthouse)
        return cls(inputs, tuple(documents.values()), resolve, shortest, dense) if documents else None

    @property
    def rows_known(self) -> bool:
        """Whether a batch of one document per row can be told (the sites' shapes are static): ``ROWS`` exists."""
        return all(d.shape is not None for d in self.documents)

    def variant(self, args: Sequence[Any]) -> str:
        """The graph the batch the graph is called with needs: ``AS_CAPTURED``, ``ON_DOCUMENT_ATTENTION``, ``ROWS``
        or ``DOCUMENTS``."""
        values = dict(zip(self.inputs, args))
        unread = [d for d in self.documents if self.dense or not self._short_by_bound(d, values)]
        if not unread:
            return AS_CAPTURED
        return once_per_batch(self._question, [args[i] for i in self._leaves], lambda: self._read(unread, values))

    def _read(self, unread: list[_DocumentSet], values: dict[fx.Node, Any]) -> str:
        found, lengths = [], []
        with torch.no_grad():
            for d in unread:
                tensors = [evaluate(n, self.resolve, values) for n in d.tensors]
                if d.shape is None:
                    found.append((longest_document(d.form, tensors), False))
                else:
                    these = document_lengths(d.form, tensors, *d.shape)
                    lengths += these
                    found.append((max(these), len(these) == d.shape[0]))
        if all(longest < self.shortest for longest, _ in found):
            name = ON_DOCUMENT_ATTENTION if self.dense and PLANNER.cudnn_share(lengths) >= DENSE_SHARE else AS_CAPTURED
        else:
            name = ROWS if all(rows for _, rows in found) else DOCUMENTS
        return name

    def _short_by_bound(self, d: _DocumentSet, values: dict[fx.Node, Any]) -> bool:
        bound = values.get(d.bound) if isinstance(d.bound, fx.Node) else d.bound
        return isinstance(bound, int) and bound < self.shortest


@dataclass(frozen=True)
class MaskCheck:
    """What a site is handed that says what it attends and is checked at each call: an explicit SDPA mask (a layer
    compiled on its own receives its mask from the model's code), or a FlexAttention block mask's sparsity (a
    hand-built one may leave out blocks its mask_mod allows), with the site's documents where it has them."""

    mask: fx.Node | None = None
    tables: tuple[Any, ...] | None = None
    """``passes.Site.block_tables``."""
    documents: Any = None
    """The site's ``DocumentSource``, for a block mask over packed documents."""
    shape: tuple[Any, ...] | None = None
    """The site's (B, H, N, d)."""

    def nodes(self) -> list[fx.Node]:
        values = [self.mask, *(self.tables or ()), *(self.documents.tensors if self.documents else ())]
        return [v for v in values if isinstance(v, fx.Node)]


class MaskProbe:
    """The masks a graph's sites are handed, checked at each call (``MaskCheck``): per site, None where the call
    attends as its site was decided (the causal mask; a block mask that leaves out nothing its mask_mod allows),
    else what it is instead. One check per model call for each set of tensors its layers share."""

    def __init__(self, inputs: tuple[fx.Node, ...], checks: tuple[MaskCheck | None, ...], resolve: Resolve) -> None:
        self.inputs, self.checks, self.resolve = inputs, checks, resolve
        leaves = {leaf for c in checks if c is not None for n in c.nodes() for leaf in ancestors(n, resolve)[1]}
        self._leaves = [i for i, node in enumerate(inputs) if node in leaves]
        self._question = ("masks", tuple(None if c is None else tuple(_computation(n, resolve) for n in c.nodes())
                                         for c in checks))

    def verdicts(self, args: Sequence[Any]) -> tuple[str | None, ...]:
        def check() -> tuple[str | None, ...]:
            values = dict(zip(self.inputs, args))
            with torch.no_grad():
                return tuple(None if c is None else self._verdict(c, values) for c in self.checks)
        return once_per_batch(self._question, [args[i] for i in self._leaves], check)

    def _verdict(self, c: MaskCheck, values: dict[fx.Node, Any]) -> str | None:
        value = (lambda v: evaluate(v, self.resolve, values) if isinstance(v, fx.Node) else v)
        if c.mask is not None:
            return causal_verdict(value(c.mask))
        starts = None
        b, n = c.shape[0], c.shape[2]
        if c.documents is not None:
            starts = starts_of(c.documents.form, [value(t) for t in c.documents.tensors], b, n)
        return block_mask_verdict(*(value(t) for t in c.tables), starts=starts, length=n)


def block_mask_verdict(kv_num: torch.Tensor, kv_index: torch.Tensor, full_num: torch.Tensor | None,
                       full_index: torch.Tensor | None, q_block: int, kv_block: int, *, starts: torch.Tensor | None,
                       length: int) -> str | None:
    """None if a FlexAttention block mask's sparsity keeps every block its causal (or, with ``starts``, causal
    within documents) mask_mod allows, and marks full only blocks the mask_mod allows whole; else what it does.
    Tables (B, H, rows, ...), broadcast over the batch and heads where of size 1."""
    if q_block != kv_block:
        return (f"FlexAttention's block mask has query blocks of {q_block} and key blocks of {kv_block}: its "
                "sparsity cannot be checked against its mask_mod")
    rows, cols = kv_num.shape[-1], -(-length // kv_block)

    def listed(num: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor:
        out = torch.zeros(*kv_num.shape, cols + 1, dtype=torch.bool, device=kv_num.device)
        if num is None:
            return out[..., :cols]
        keep = torch.arange(index.shape[-1], device=index.device) < num[..., None]
        return out.scatter(-1, torch.where(keep, index.long(), cols), True)[..., :cols]

    partial, full = listed(kv_num, kv_index), listed(full_num, full_index)
    i = torch.arange(rows, device=kv_num.device)[:, None]
    j = torch.arange(cols, device=kv_num.device)[None]
    need, whole = j <= i, j < i
    if starts is not None:  # (B, N): document of each block's first and last token
        doc = (starts | (torch.arange(length, device=starts.device) == 0)).long().cumsum(1)
        first = doc[:, (torch.arange(rows, device=doc.device) * q_block).clamp(max=length - 1)]
        last = doc[:, ((torch.arange(cols, device=doc.device) + 1) * kv_block - 1).clamp(max=length - 1)]
        kv_first = doc[:, (torch.arange(cols, device=doc.device) * kv_block).clamp(max=length - 1)]
        q_last = doc[:, ((torch.arange(rows, device=doc.device) + 1) * q_block - 1).clamp(max=length - 1)]
        need = need & (first[:, :, None] <= last[:, None, :])
        whole = whole & (kv_first[:, None, :] == q_last[:, :, None])
        need, whole = need[:, None], whole[:, None]  # (B, 1, rows, cols) against the tables' heads
    if not bool((need <= (partial | full)).all()):
        return ("FlexAttention's block mask leaves out blocks its mask_mod allows (a hand-built sparsity, e.g. "
                "BlockMask.from_kv_blocks): it is not the mask Lighthouse computes")
    if not bool((full <= whole).all()):
        return "FlexAttention's block mask marks blocks full that its mask_mod masks in part"
    return None


def once_per_batch(question: Any, inputs: Sequence[Any], answer: Callable[[], Any]) -> Any:
    """``answer()`` for these graph inputs, asked once per model call (``lhcompile.calls.Batch``) while the graphs
    asking ``question`` are handed the very same inputs; outside a model call, asked each time."""
    batch = current_batch()
    identity = tuple(_identity(x) for x in inputs)
    if batch is None or None in identity:
        return answer()
    key = (question, _key(identity))
    known = batch.found.get(key)
    if known is not None and _same(known[0], identity):
        return known[1]
    value = answer()
    batch.found[key] = (identity, value)
    return value


def _computation(node: fx.Node, resolve: Resolve) -> tuple:
    """How a value is computed from a graph's inputs, as a key that two graphs computing it alike share."""
    ancestry, _ = ancestors(node, resolve)
    return tuple(sorted(f"{n.op}:{getattr(n.target, '__name__', n.target)}" for n in ancestry if n.op != "placeholder"))


def _signature(documents: _DocumentSet, resolve: Resolve) -> tuple:
    """How a set of documents is computed from a graph's inputs, as a key that two graphs computing it alike share."""
    return documents.form, tuple(_computation(t, resolve) for t in documents.tensors), documents.shape


def _identity(value: Any) -> tuple | None:
    """What tells a graph input the same within a model call: a tensor's object, version counter and storage (None
    for an inference tensor, which has no version counter), any other value itself. Weakly held and compared by
    object, so that it never keys a freed tensor's successor."""
    if not isinstance(value, torch.Tensor):
        return (value,)
    try:
        return (weakref.ref(value), value._version, value.data_ptr())
    except RuntimeError:
        return None


def _key(identity: tuple) -> tuple:
    """``_identity``s as a dict key: the object's id in place of the weak reference (``_same`` checks the object)."""
    return tuple((id(i[0]()), *i[1:]) if isinstance(i[0], weakref.ref) else i for i in identity)


def _same(last: list[tuple], now: list[tuple]) -> bool:
    """Whether the inputs of ``now`` are those of ``last`` unchanged: for tensors, the very object ``last`` held,
    still alive (an id alone can be reused once an object is freed)."""
    return all(a[0]() is b[0]() and a[1:] == b[1:] if isinstance(a[0], weakref.ref) else a == b
               for a, b in zip(last, now))
