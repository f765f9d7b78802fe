"""Find the scaled-dot-product-attention calls of an FX graph, in every form they take, with their arguments."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .causal_mask import MaskProof, Proofs, Resolve, prove_causal
from .meta import node_shape, user_path
from .subgraphs import subgraph_calls

aten = torch.ops.aten

_TORCH_SDPA_PARAMS = (
    ("query", None),
    ("key", None),
    ("value", None),
    ("attn_mask", None),
    ("dropout_p", 0.0),
    ("is_causal", False),
    ("scale", None),
    ("enable_gqa", False),
)


def _aten_forms() -> list[Any]:
    names = [
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    ]
    return [getattr(aten, name).default for name in names if hasattr(aten, name)]


# torch.nn.functional.scaled_dot_product_attention is the same builtin as torch._C._nn's
SDPA_TARGETS: tuple[Any, ...] = (torch._C._nn.scaled_dot_product_attention, *_aten_forms())


@dataclass
class SdpaSite:
    """One SDPA call in a graph, its arguments bound by name, and what the graph tells of its shapes."""

    node: fx.Node
    index: int
    args: dict[str, Any]
    module_path: str
    q_shape: tuple[Any, ...] | None
    k_shape: tuple[Any, ...] | None
    extra_nodes: list[fx.Node] = field(default_factory=list)
    """getitem nodes of a tuple-returning backend op (removed and restored along with it)."""
    output: fx.Node | None = None
    """The node whose value is the attention output (the call itself, or its getitem 0)."""
    problem: str | None = None
    """Why this call cannot be rewritten whatever the configuration, or None."""
    mask_proof: MaskProof | None = None
    """For a call with an explicit attn_mask: whether it is the causal mask (then SDPA's is_causal=True computes
    the same), and which module buffers the proof took as constants."""

    @property
    def q(self) -> fx.Node:
        return self.args["query"]

    @property
    def k(self) -> fx.Node:
        return self.args["key"]

    @property
    def mask(self) -> Any:
        return self.args.get("attn_mask", self.args.get("attn_bias"))

    @property
    def causal_mask(self) -> bool:
        """The call has an explicit mask, proven causal, and nothing else keeps it from is_causal=True."""
        return self.problem is None and self.mask_proof is not None and self.mask_proof.reason is None


def bind_arguments(target: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of an SDPA call by parameter name, defaults filled in."""
    if isinstance(target, torch._ops.OpOverload):
        params = [(a.name, a.default_value if a.has_default_value() else None) for a in target._schema.arguments]
    else:
        params = list(_TORCH_SDPA_PARAMS)
    bound = {name: default for name, default in params}
    for (name, _), value in zip(params, args):
        bound[name] = value
    bound.update(kwargs)
    return bound


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that made this call, as the user names it ('' at top level)."""
    stack = node.meta.get("nn_module_stack")
    return user_path(str(list(stack.values())[-1][0])) if stack else ""


def _problem(site: SdpaSite, returns_tuple: bool, resolve: Resolve | None, proofs: Proofs) -> str | None:
    a = site.args
    if site.mask is not None:
        if not isinstance(site.mask, fx.Node):
            return "attn_mask is a constant outside the graph; cannot prove it causal"
        site.mask_proof = prove_causal(site.mask, resolve, proofs)
        if site.mask_proof.reason:
            return site.mask_proof.reason
    elif not a.get("is_causal", False):
        return "not causal (is_causal=False)"
    if a.get("dropout_p", 0.0) not in (0, 0.0):
        return f"dropout_p={a['dropout_p']} (Lighthouse has no attention dropout)"
    if returns_tuple:
        others = [u for u in site.node.users if u not in site.extra_nodes or (u.args[1] != 0 and u.users)]
        if others:
            return "uses outputs of the backend op other than the attention output (e.g. logsumexp)"
    if site.q_shape is None or site.k_shape is None:
        return None
    if len(site.q_shape) != 4:
        return f"query is not (B, H, N, d) but has shape {site.q_shape}"
    if site.q_shape[2] != site.k_shape[2]:
        return f"query length {site.q_shape[2]} differs from key length {site.k_shape[2]} (not self-attention)"
    return None


def find_sdpa_sites(graph: fx.Graph, resolve: Resolve | None = None, proofs: Proofs | None = None
                    ) -> list[SdpaSite]:
    """Every SDPA call of the graph, in graph order, with the reason it can never be rewritten (if any).

    ``resolve`` maps a placeholder of ``graph`` to the node of an enclosing graph that feeds it (when the graph
    is the body of a higher-order op), so that a mask made outside can still be proven causal; ``proofs`` shares
    the masks already proven (or not) with the other graphs of one capture.
    """
    proofs = {} if proofs is None else proofs
    sites = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        returns_tuple = isinstance(node.target, torch._ops.OpOverload) and len(node.target._schema.returns) > 1
        site = SdpaSite(
            node=node,
            index=len(sites),
            args=bind_arguments(node.target, node.args, node.kwargs),
            module_path=module_path(node),
            q_shape=None,
            k_shape=None,
        )
        site.q_shape, site.k_shape = node_shape(site.q), node_shape(site.k)
        if returns_tuple:
            # getitems of the tuple, in graph order; unused ones (e.g. a dead logsumexp) go and come back with it
            site.extra_nodes = sorted((u for u in node.users if u.target is operator.getitem), key=order.__getitem__)
            outputs = [u for u in site.extra_nodes if u.args[1] == 0]
            site.output = outputs[0] if len(outputs) == 1 else None
        else:
            site.output = node
        site.problem = _problem(site, returns_tuple, resolve, proofs)
        if site.problem is None and site.output is None:  # only a tuple op's getitems can leave it unset
            site.problem = "attention output is unused" if not outputs else "attention output is read by several getitems"
        sites.append(site)
    return sites


def count_sdpa_calls(gm: fx.GraphModule) -> int:
    """SDPA calls in gm and in the bodies nested in it (each body once, as the pass numbers them)."""
    bodies = {call.name: call.module for call in subgraph_calls(gm)}
    return (sum(node.op == "call_function" and node.target in SDPA_TARGETS for node in gm.graph.nodes)
            + sum(count_sdpa_calls(body) for body in bodies.values()))


_ATTENTION_WORDS = re.compile(r"attention|attn|softmax", re.IGNORECASE)


def attention_like_calls(graph: fx.Graph) -> list[str]:
    """Names of the calls of a graph that look like attention but are no SDPA call (e.g. flex_attention)."""
    names = []
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and node.target not in SDPA_TARGETS:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            if _ATTENTION_WORDS.search(str(name)):
                names.append(str(name))
    return names
