"""Find the scaled-dot-product-attention calls of an FX graph, in every form they take, with their arguments."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .causal_mask import Proofs, Resolve, why_mask_not_causal
from .meta import node_shape

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

    @property
    def q(self) -> fx.Node:
        return self.args["query"]

    @property
    def k(self) -> fx.Node:
        return self.args["key"]

    @property
    def mask(self) -> Any:
        return self.args.get("attn_mask", self.args.get("attn_bias"))


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


# what Dynamo and wrappers put between a user's module names: a bound method's closure cell
# (layers.0.attention.forward.__closure__.0.cell_contents.__self__.inner_attention), a module's __dict__ and
# _modules, torch.compile's, checkpoint_wrapper's and FSDP1's wrapped modules
_NOT_MODULE_NAMES = re.compile(
    r"\.(forward\.__closure__\.\d+\.cell_contents(\.__self__)?|__dict__|_modules|_orig_mod|_checkpoint_wrapped_module"
    r"|_fsdp_wrapped_module)"
    r"(?=\.|$)"
)


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that made this call, as the user names it ('' at top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    # Dynamo writes paths like L['self'].model.layers[0].self_attn or L['self']._modules['model']
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^]'\"]+)['\"]?\]", r".\1", path)
    path = _NOT_MODULE_NAMES.sub("", "." + path)
    return path.lstrip(".")


def _problem(site: SdpaSite, returns_tuple: bool, resolve: Resolve | None, proofs: Proofs) -> str | None:
    a = site.args
    if site.mask is not None:
        if not isinstance(site.mask, fx.Node):
            return "attn_mask is a constant outside the graph; cannot prove it causal"
        reason = why_mask_not_causal(site.mask, resolve, proofs)
        if reason:
            return reason
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
