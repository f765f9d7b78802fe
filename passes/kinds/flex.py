"""FlexAttention (the ``flex_attention`` higher-order op) whose mask is plain causal or causal within documents.

The mask_mod is read as the conjunction of its comparisons (``and_masks`` and ``&``), each recognised as one of:
causal (``q_idx >= kv_idx``), the same document by id (``ids[b, q_idx] == ids[b, kv_idx]``: torchtitan's
``get_document_mask_mod``, transformers' packed-sequence mask), a key at or after its query's document start
(``kv_idx >= starts[doc[q_idx]]``: torchtitan's one-row ``get_efficient_causal_mask_mod_for_packed_document``), or
a query at or before its key's document end (``q_idx <= ends[b, kv_idx]``: its batched form). The documents are
then read from the mask's own tensors at run time. Any other comparison, ``|``, a score_mod or a returned
logsumexp keeps the call as it is, with the reason. The block mask's sparsity tables (``Site.block_tables``) are
the call's too: a hand-built one (``BlockMask.from_kv_blocks``) may leave out blocks its mask_mod allows, which the
caller checks at run time.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..causal_mask import Proofs, Resolve
from ..meta import node_shape
from ..site import DocumentSource, SdpaLayout, Site, module_path, tuple_outputs

aten = torch.ops.aten

_AND = {operator.and_, torch.bitwise_and, torch.logical_and, "__and__", "bitwise_and", "logical_and",
        aten.bitwise_and.Tensor, aten.logical_and.default}
_COMPARE = {operator.ge: "ge", operator.le: "le", operator.gt: "gt", operator.lt: "lt", operator.eq: "eq",
            torch.ge: "ge", torch.le: "le", torch.eq: "eq", aten.ge.Tensor: "ge", aten.le.Tensor: "le",
            aten.gt.Tensor: "gt", aten.lt.Tensor: "lt", aten.eq.Tensor: "eq", "ge": "ge", "le": "le", "eq": "eq",
            "__ge__": "ge", "__le__": "le", "__eq__": "eq"}
_ONES = {"new_ones", torch.ones, aten.new_ones.default, aten.ones.default, aten.scalar_tensor.default}
_INDEX = {operator.getitem, aten.index.Tensor}
_MIRROR = {"ge": "le", "le": "ge", "gt": "lt", "lt": "gt", "eq": "eq"}


@dataclass(frozen=True)
class _Lookup:
    table: int
    """Which of the mask's tensors (its placeholder after b, h, q_idx, kv_idx)."""
    keys: tuple[Any, ...]
    """Each index: 'b', 'h', 'q', 'kv' or another _Lookup."""


class _Unknown(Exception):
    pass


def _value(node: Any, env: dict[fx.Node, Any]) -> Any:
    if not isinstance(node, fx.Node):
        raise _Unknown(f"constant {node!r}")
    if node in env:
        return env[node]
    target = node.target
    if node.op not in ("call_function", "call_method"):
        raise _Unknown(node.name)
    if target in _ONES:
        return frozenset()
    if target in _AND:
        parts = [_value(a, env) for a in node.args[:2]]
        if not all(isinstance(p, frozenset) for p in parts):
            raise _Unknown(f"{node.name} combines values that are not comparisons")
        return parts[0] | parts[1]
    if target in _COMPARE:
        lhs, rhs = (_value(a, env) for a in node.args[:2])
        return frozenset({(_COMPARE[target], lhs, rhs)})
    if target in _INDEX:
        table, index = node.args[0], node.args[1]
        table = _value(table, env)
        if not isinstance(table, int):
            raise _Unknown(f"{node.name} indexes a value that is not one of the mask's tensors")
        keys = index if isinstance(index, (tuple, list)) else (index,)
        return _Lookup(table, tuple(_value(key, env) for key in keys))
    raise _Unknown(f"{node.name} ({getattr(target, '__name__', target)})")


def _atoms(mask_mod: fx.GraphModule) -> frozenset:
    placeholders = [n for n in mask_mod.graph.nodes if n.op == "placeholder"]
    env: dict[fx.Node, Any] = dict(zip(placeholders[:4], ("b", "h", "q", "kv")))
    env.update({p: i for i, p in enumerate(placeholders[4:])})
    out = next(n for n in mask_mod.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    atoms = _value(out, env)
    if not isinstance(atoms, frozenset):
        raise _Unknown("the mask is not a conjunction of comparisons")
    return atoms


def _per_token(lookup: Any, token: str) -> bool:
    """Whether lookup is table[b, token] or table[token]."""
    return isinstance(lookup, _Lookup) and lookup.keys in (("b", token), (token,))


def _classify(op: str, lhs: Any, rhs: Any) -> tuple[str, tuple] | None:
    """('causal', ()) / ('ids', (table,)) / ('first_token', (table, index)) / ('last_token', (table,)), or None."""
    for op, lhs, rhs in ((op, lhs, rhs), (_MIRROR[op], rhs, lhs)):
        if (op, lhs, rhs) == ("ge", "q", "kv"):
            return "causal", ()
        if op == "eq" and _per_token(lhs, "q") and _per_token(rhs, "kv") and lhs.table == rhs.table \
                and lhs.keys[:-1] == rhs.keys[:-1]:
            return "ids", (lhs.table,)
        if op == "ge" and lhs == "kv" and isinstance(rhs, _Lookup) and len(rhs.keys) == 1 \
                and _per_token(rhs.keys[0], "q"):
            return "first_token", (rhs.table, rhs.keys[0].table)
        if op == "le" and lhs == "q" and _per_token(rhs, "kv"):
            return "last_token", (rhs.table,)
    return None


_DESCRIPTIONS = {
    "ids": "document ids of the FlexAttention mask",
    "first_token": "document starts of the FlexAttention mask (one row)",
    "last_token": "document ends of the FlexAttention mask",
}


class Flex(SdpaLayout):
    name = "flex"
    rope = True
    trains_on = ("cuda",)  # FlexAttention has no backward on the CPU

    def matches(self, node: fx.Node) -> bool:
        return node.op == "call_function" and node.target is getattr(torch.ops.higher_order, "flex_attention", None)

    def site(self, node: fx.Node, index: int, resolve: Resolve | None, proofs: Proofs) -> Site:
        q, k, v, score_mod, block_mask, scale, options, score_buffers, mask_buffers = (
            list(node.args) + [None] * 9)[:9]
        args = {"query": q, "key": k, "value": v, "score_mod": score_mod, "block_mask": block_mask, "scale": scale,
                "kernel_options": options, "score_mod_other_buffers": score_buffers,
                "mask_mod_other_buffers": mask_buffers}
        site = Site(self, node, index, args, module_path(node), node_shape(q), node_shape(k))
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        site.extra_nodes, site.output, problem = tuple_outputs(node, order)
        site.problem = self._problem(site) or problem
        if isinstance(block_mask, tuple) and len(block_mask) >= 13:
            # (q_len, kv_len, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, ..., Q_BLOCK_SIZE,
            # KV_BLOCK_SIZE, mask_mod): its sparsity, which a hand-built BlockMask need not derive from its mask_mod
            site.block_tables = (*block_mask[2:6], block_mask[-3], block_mask[-2])
        return site

    def _problem(self, site: Site) -> str | None:
        gm = site.node.graph.owning_module
        score_mod = getattr(gm, site.args["score_mod"].target, None) if isinstance(site.args["score_mod"], fx.Node) \
            else None
        if score_mod is None or not _is_identity(score_mod):
            return "FlexAttention with a score_mod (it changes the scores; Lighthouse computes plain attention)"
        block_mask = site.args["block_mask"]
        mask_mod = getattr(gm, block_mask[-1].target, None) if isinstance(block_mask, tuple) and \
            isinstance(block_mask[-1], fx.Node) else None
        if mask_mod is None:
            return "FlexAttention's block mask has no mask_mod graph"
        try:
            atoms = _atoms(mask_mod)
        except _Unknown as why:
            return f"FlexAttention's mask_mod is not plain causal or document-causal ({why})"
        kinds = [(atom, _classify(*atom)) for atom in atoms]
        unknown = [atom for atom, kind in kinds if kind is None]
        if unknown:
            return f"FlexAttention's mask_mod has a comparison that is neither causal nor a document mask ({unknown[0]})"
        found = {kind for _, kind in kinds}
        if ("causal", ()) not in found:
            return "FlexAttention's mask_mod is not causal (no q_idx >= kv_idx)"
        documents = [kind for kind in found if kind[0] != "causal"]
        if len(documents) > 1:
            return "FlexAttention's mask_mod combines several document masks"
        if documents:
            form, tables = documents[0]
            buffers = site.args["mask_mod_other_buffers"] or ()
            nodes = tuple(buffers[i] for i in tables)
            site.documents = DocumentSource(form, nodes, _DESCRIPTIONS[form])
        if site.q_shape is not None and site.k_shape is not None and site.q_shape[2] != site.k_shape[2]:
            return f"query length {site.q_shape[2]} differs from key length {site.k_shape[2]} (not self-attention)"
        return None

    def op_name(self, target: Any) -> str:
        return "flex_attention"


def _is_identity(score_mod: fx.GraphModule) -> bool:
    placeholders = [n for n in score_mod.graph.nodes if n.op == "placeholder"]
    out = next(n for n in score_mod.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
    return bool(placeholders) and out is placeholders[0]
