"""``scaled_dot_product_attention`` in every form it takes in a graph: causal, or with a mask proven causal."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..causal_mask import Proofs, Resolve, prove_causal
from ..meta import node_shape
from ..site import SdpaLayout, Site, bind_arguments, module_path, tuple_outputs

aten = torch.ops.aten

SDPA_PARAMS = (
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


def _mask(args: dict[str, Any]) -> Any:
    return args.get("attn_mask", args.get("attn_bias"))


class Sdpa(SdpaLayout):
    """SDPA: ``F.scaled_dot_product_attention`` / ``torch._C._nn``, ``aten.scaled_dot_product_attention`` and the
    backend ops (flash, flash-for-cpu, efficient, cuDNN), with positional or keyword arguments."""

    name = "sdpa"
    rope = True

    def matches(self, node: fx.Node) -> bool:
        return node.op == "call_function" and node.target in SDPA_TARGETS

    def site(self, node: fx.Node, index: int, resolve: Resolve | None, proofs: Proofs) -> Site:
        args = bind_arguments(node.target, node.args, node.kwargs, SDPA_PARAMS)
        site = Site(self, node, index, args, module_path(node), node_shape(args["query"]), node_shape(args["key"]))
        returns_tuple = isinstance(node.target, torch._ops.OpOverload) and len(node.target._schema.returns) > 1
        tuple_problem = None
        if returns_tuple:
            order = {n: i for i, n in enumerate(node.graph.nodes)}
            site.extra_nodes, site.output, tuple_problem = tuple_outputs(node, order)
        else:
            site.output = node
        site.problem = self._problem(site, resolve, proofs) or tuple_problem
        site.causal_proven = site.problem is None and site.mask_proof is not None
        return site

    def _problem(self, site: Site, resolve: Resolve | None, proofs: Proofs) -> str | None:
        a, mask = site.args, _mask(site.args)
        if mask is not None:
            if not isinstance(mask, fx.Node):
                return "attn_mask is a constant outside the graph; cannot prove it causal"
            site.mask_proof = prove_causal(mask, resolve, proofs)
            if site.mask_proof.reason:
                other = self._call_problem(site)
                if site.mask_proof.runtime and other is None:
                    site.runtime_mask = mask
                return site.mask_proof.reason
        elif not a.get("is_causal", False):
            return "not causal (is_causal=False)"
        return self._call_problem(site)

    @staticmethod
    def _call_problem(site: Site) -> str | None:
        """Why the call cannot run Lighthouse whatever its mask."""
        a = site.args
        if a.get("dropout_p", 0.0) not in (0, 0.0):
            return f"dropout_p={a['dropout_p']} (Lighthouse has no attention dropout)"
        if site.q_shape is None or site.k_shape is None:
            return None
        if len(site.q_shape) != 4:
            return f"query is not (B, H, N, d) but has shape {site.q_shape}"
        if site.q_shape[2] != site.k_shape[2]:
            return f"query length {site.q_shape[2]} differs from key length {site.k_shape[2]} (not self-attention)"
        return None

    def op_name(self, target: Any) -> str:
        return str(target) if isinstance(target, torch._ops.OpOverload) else f"F.{target.__name__}"
