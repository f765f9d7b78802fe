"""``torch.nn.attention.varlen.varlen_attn``: packed documents given by cumulative lengths (torchtitan's
``VarlenAttention``). Its (T, H, d) tokens are the rows of the batch laid end to end: one sequence of T tokens
whose documents begin at ``cu_seq_q``."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..causal_mask import Proofs, Resolve
from ..meta import node_shape
from ..site import DocumentSource, SdpaLayout, Site, bind_arguments, module_path, tuple_outputs


def _varlen_targets() -> tuple[Any, ...]:
    namespace = getattr(torch.ops, "torch_attn", None)
    packet = getattr(namespace, "_varlen_attn", None) if namespace is not None else None
    return () if packet is None else (packet, packet.default)


class Varlen(SdpaLayout):
    name = "varlen"
    rope = False  # its tokens are rows laid end to end: no position axis to follow the rotation along
    trains_on = ("cuda",)  # varlen_attn has no CPU kernel

    def matches(self, node: fx.Node) -> bool:
        return node.op == "call_function" and node.target in _varlen_targets()

    def site(self, node: fx.Node, index: int, resolve: Resolve | None, proofs: Proofs) -> Site:
        target = node.target if isinstance(node.target, torch._ops.OpOverload) else node.target.default
        args = bind_arguments(target, node.args, node.kwargs)
        q, k = node_shape(args["query"]), node_shape(args["key"])
        as_sdpa = lambda s: None if s is None or len(s) != 3 else (1, s[1], s[0], s[2])  # noqa: E731
        site = Site(self, node, index, args, module_path(node), as_sdpa(q), as_sdpa(k))
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        site.extra_nodes, site.output, problem = tuple_outputs(node, order)
        site.problem = self._problem(args) or problem
        cu = args["cu_seq_q"]
        # varlen's kernels compute no row past max_q of a document, so it bounds every document's length
        site.documents = DocumentSource("cu_seqlens", (cu,), "cu_seq_q of varlen_attn", longest=args.get("max_q"))
        return site

    @staticmethod
    def _problem(args: dict[str, Any]) -> str | None:
        window = list(args.get("window_size") or (-1, -1))
        if not args.get("is_causal") or window not in ([-1, 0], [-1, -1]):
            return f"varlen_attn is not causal within documents (is_causal={args.get('is_causal')}, window_size=" \
                   f"{tuple(window)}; Lighthouse needs window_size=(-1, 0))"
        if args.get("cu_seq_k") is not args.get("cu_seq_q"):
            return "varlen_attn's keys have other documents than its queries (cu_seq_k is not cu_seq_q)"
        if args.get("seqused_k") is not None or args.get("block_table") is not None:
            return "varlen_attn reads a KV cache (seqused_k / block_table): decoding, not training"
        return None

    def inputs(self, site: Site, args: dict[str, Any]) -> tuple[Any, Any, Any]:
        return tuple(args[name].transpose(0, 1).unsqueeze(0) for name in (self.query, self.key, self.value))

    def output_from(self, site: Site, out: Any, args: dict[str, Any]) -> Any:
        return out.squeeze(0).transpose(0, 1).contiguous()

    def op_name(self, target: Any) -> str:
        return "varlen_attn"
