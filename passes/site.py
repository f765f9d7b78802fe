"""One attention call found in a graph, whatever its kind, as the rest of the pass sees it.

Every kind of attention call (``passes.kinds``) is matched into the same ``Site``: its arguments bound by name,
its query, key and value in SDPA's (B, H, N, d) layout (``inputs``), how the replacement's (B, H, N, d) result
becomes what the call returned (``output_from``), and what it attends: plain causal attention, or causal
attention within documents (``documents``). Deciding, reporting and rewriting then never ask which kind it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.fx as fx

from .causal_mask import MaskProof, Proofs, Resolve
from .meta import user_path

DocumentForm = Literal["starts", "ids", "cu_seqlens", "first_token", "last_token", "whole_rows"]
"""How a call's own tensors say where its documents are: a (B, N) bool of document starts, a (B or 1, N) id per
token (a document is a run), cumulative lengths over the rows laid end to end, each token's document's first
token (a table lookup ``table[index[t]]``, torchtitan's one-row form), each token's document's last token
(torchtitan's batched form), or one document per row (a plainly causal call; the tensor is its query)."""


@dataclass(frozen=True)
class DocumentSource:
    """Where a site's documents come from: graph values of the call and what they mean."""

    form: DocumentForm
    tensors: tuple[fx.Node, ...]
    """The graph values that hold them (``first_token``: the table, then the index)."""
    description: str
    """For the report: e.g. "cu_seq_q of varlen_attn"."""
    longest: Any = None
    """A graph value (a node or a constant) that the call's own contract makes at least the longest document's
    length, such as varlen's ``max_q``, or None: a batch whose bound is short has no long document, known without
    reading the documents."""


@dataclass
class Site:
    """One attention call of a graph, normalized to what Lighthouse replaces."""

    kind: SiteKind
    node: fx.Node
    index: int
    """Position among the graph's attention calls of every kind, in graph order."""
    args: dict[str, Any]
    module_path: str
    q_shape: tuple[Any, ...] | None
    """Query shape in SDPA's layout (B, H, N, d), or None where the graph records no shapes."""
    k_shape: tuple[Any, ...] | None
    extra_nodes: list[fx.Node] = field(default_factory=list)
    """getitem nodes of a tuple-returning call (removed and restored along with it)."""
    output: fx.Node | None = None
    """The node whose value is the attention output (the call itself, or its getitem 0)."""
    problem: str | None = None
    """Why this call cannot be rewritten whatever the configuration, or None."""
    mask_proof: MaskProof | None = None
    """For an SDPA call with an explicit attn_mask: whether it is the causal mask, and which module buffers the
    proof took as constants."""
    documents: DocumentSource | None = None
    """None: plain causal attention; else causal within the documents it names."""
    causal_proven: bool = False
    """The call's mask (an explicit SDPA mask, or documents whose values are known at capture) is proven to be the
    plain causal one, so causal SDPA computes the same without it."""
    block_tables: tuple[Any, ...] | None = None
    """FlexAttention: its block mask's (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, Q_BLOCK_SIZE,
    KV_BLOCK_SIZE), graph values or constants (None where it has no full blocks)."""
    runtime_mask: fx.Node | None = None
    """An explicit mask that cannot be proven causal at capture but can be checked at each call, from the graph's
    inputs (``MaskProof.runtime``), where that is the only reason the call could not run Lighthouse."""

    @property
    def q(self) -> fx.Node:
        return self.args[self.kind.query]

    @property
    def k(self) -> fx.Node:
        return self.args[self.kind.key]

    @property
    def op(self) -> str:
        """The call's name in the report."""
        return self.kind.op_name(self.node.target)


class SiteKind(Protocol):
    """One kind of attention call: how it is matched, what its arguments mean, and how its values map to SDPA's."""

    name: str
    query: str
    """Names of its query, key and value arguments among the bound ones."""
    key: str
    value: str
    rope: bool
    """Whether the rotation upstream of its query and key can be found (its inputs are in SDPA's layout)."""
    trains_on: tuple[str, ...] | None
    """The device types on which the call has a forward and a backward (None: every one)."""

    def matches(self, node: fx.Node) -> bool:
        """Whether the node is a call of this kind."""

    def site(self, node: fx.Node, index: int, resolve: Resolve | None, proofs: Proofs) -> Site:
        """The call matched: arguments bound, shapes, the output node, what it attends, and why it can never be
        rewritten (``problem``)."""

    def inputs(self, site: Site, args: dict[str, Any]) -> tuple[Any, Any, Any]:
        """Query, key and value in (B, H, N, d) from the call's arguments (graph values as fx.Proxy)."""

    def output_from(self, site: Site, out: Any, args: dict[str, Any]) -> Any:
        """The value the call returned, from the replacement's (B, H, N, d) attention output."""

    def scale(self, site: Site, args: dict[str, Any]) -> Any:
        """The softmax scale the call uses, from its arguments (None: 1/sqrt(d))."""

    def op_name(self, target: Any) -> str:
        """The op's name in the report."""


class SdpaLayout:
    """What most kinds share: query, key and value already in SDPA's (B, H, N, d) layout under the argument names
    ``query``, ``key`` and ``value``, the attention output returned as the call returns it, and a ``scale``
    argument (None: 1/sqrt(d)). A kind laid out otherwise overrides ``inputs`` and ``output_from``."""

    query, key, value = "query", "key", "value"
    trains_on: tuple[str, ...] | None = None

    def inputs(self, site: Site, args: dict[str, Any]) -> tuple[Any, Any, Any]:
        return args[self.query], args[self.key], args[self.value]

    def output_from(self, site: Site, out: Any, args: dict[str, Any]) -> Any:
        return out

    def scale(self, site: Site, args: dict[str, Any]) -> Any:
        return args.get("scale")


def bind_arguments(target: Any, args: tuple, kwargs: dict, params: tuple[tuple[str, Any], ...] = ()
                   ) -> dict[str, Any]:
    """Arguments of a call by parameter name, defaults filled in: from an op's schema, or ``params`` (name, default)
    for Python functions."""
    if isinstance(target, torch._ops.OpOverload):
        params = tuple((a.name, a.default_value if a.has_default_value() else None) for a in target._schema.arguments)
    bound = {name: default for name, default in params}
    for (name, _), value in zip(params, args):
        bound[name] = value
    bound.update(kwargs)
    return bound


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that made this call, as the user names it ('' at top level)."""
    stack = node.meta.get("nn_module_stack")
    return user_path(str(list(stack.values())[-1][0])) if stack else ""


def tuple_outputs(node: fx.Node, order: dict[fx.Node, int]) -> tuple[list[fx.Node], fx.Node | None, str | None]:
    """The getitems of a tuple-returning call (in graph order), the one holding the attention output, and why the
    call cannot be rewritten if it uses another output (e.g. the logsumexp) or its output oddly."""
    import operator

    getitems = sorted((u for u in node.users if u.target is operator.getitem), key=order.__getitem__)
    others = [u for u in node.users if u not in getitems or (u.args[1] != 0 and u.users)]
    if others:
        return getitems, None, "uses outputs of the call other than the attention output (e.g. logsumexp)"
    outputs = [u for u in getitems if u.args[1] == 0]
    if len(outputs) != 1:
        return getitems, None, "attention output is unused" if not outputs else \
            "attention output is read by several getitems"
    return getitems, outputs[0], None


