"""What the pass says: the report's rows of the sites a call ran, every reason a site stays dense, and the warnings
about a captured graph, as texts in one place."""

from __future__ import annotations

from collections import Counter

import torch

from ..passes import RopeMatch, Site, attention_like_calls
from ..passes.meta import join_path
from ..report import Report, SiteReport
from .decision import CapturedGraph, Decision, Pattern, Scope
from .options import Options



DYNAMIC = "sequence length is dynamic"


def _module_class(site: Site) -> type | None:
    stack = site.node.meta.get("nn_module_stack")
    return list(stack.values())[-1][1] if stack else None


def _module(root: torch.nn.Module | None, site: Site) -> torch.nn.Module | None:
    """The module that made the call, where the graph's root is known and the path resolves in it."""
    if root is None:
        return None
    try:
        module = root.get_submodule(site.module_path)
    except AttributeError:
        return None
    cls = _module_class(site)
    # a graph traced from a submodule's own frame (after a graph break) names paths from that submodule
    return module if cls is None or isinstance(module, cls) else None


def advice(site: Site, scope: Scope) -> str:
    """What to do about a site that can never be rewritten, where we know."""
    cls = _module_class(site)
    module = _module(scope.root, site)
    if site.problem.startswith("explicit attn_mask is computed from the graph's inputs") and cls is not None \
            and getattr(cls, "__module__", "").startswith("transformers.") \
            and getattr(module, "is_causal", True):
        if getattr(getattr(module, "config", None), "_attn_implementation", None) == "causal_sdpa":
            return ("; the model already uses attn_implementation='causal_sdpa', which builds this mask because the "
                    "call is not plainly causal (padding, a window, or an overlay such as bidirectional image blocks)")
        return ("; if it is causal (no padding, no sliding window shorter than the sequence; packed documents are "
                "kept apart), attn_implementation='causal_sdpa' (import lhcompile.integrations.hf) computes it "
                "without the N x N mask, and keeps the model's own sdpa path where it is not")
    return ""


def site_rows(decisions: list[Decision], pattern: Pattern, positions: tuple[int, ...], paths: tuple[str, ...],
              total: int, graph_id: int, options: Options, scope: Scope,
              masks: tuple[str | None, ...] | None = None) -> list[SiteReport]:
    """The report's rows of the sites a call ran at ``positions`` (module ``paths``) among ``total``; ``masks``: per
    site, what its mask was at the call where it is not the causal mask."""
    rows = []
    masks = masks or (None,) * len(decisions)
    for d, flags, position, path, mask in zip(decisions, pattern, positions, paths, masks):
        site = d.site
        kv_heads = site.k_shape[1] if site.k_shape and len(site.k_shape) == 4 else None
        reasons = [*d.reasons, *(f"{mask} (checked at each call)" if flag == "mask" else
                                 _FLAGS[flag](position, total, options) for flag in flags)]
        rows.append(SiteReport(graph_id, position, path, site.op, site.q_shape, kv_heads, not reasons,
                               _reason(d, reasons, options), scope.training, d.documents is not None))
    return rows


_FLAGS = {
    "dense_layers": lambda position, total, options: (
        f"dense layer (site {position} of {total} is in dense_layers={options.config.dense_layers})"),
    "filter_fn": lambda position, total, options: "excluded by filter_fn",
}


def _reason(d: Decision, reasons: list[str], options: Options) -> str:
    site = d.site
    if not reasons:
        documents = f" per document ({d.documents.description})" if d.documents else ""
        checked = " (its attn_mask, handed to the graph, is checked to be the causal mask at each call)" \
            if d.mask is not None else ""
        return f"lighthouse{documents}{checked}{_rope_note(d.rotation, site)}"
    reason = "; ".join(reasons) + options.placement.dense_note
    if site.causal_proven and not options.placement.rewrites_dense:
        reason += "; its mask is the causal mask, so it runs as SDPA with is_causal=True"
    return reason


def _rope_note(rotation: tuple[RopeMatch, RopeMatch] | str | None, site: Site) -> str:
    if rotation is None:
        return ""
    if isinstance(rotation, str):
        return f"; RoPE before pooling (the paper's order): {rotation}"
    match = rotation[0]
    return f"; RoPE after selection ({match.form}, {match.rotary_dim} of {site.q_shape[3]} dims)"


def warn_at_capture(graphs: list[CapturedGraph], decisions: list[Decision], graph_id: int, scope: Scope, report: Report
                    ) -> None:
    """Say what a captured graph leaves undone, or takes on a guess, whatever layer it serves."""
    if scope.mode_from_grad and decisions:
        report.once.warn(f"mode from grad {scope.training}", _mode_guess(graph_id, len(decisions), scope.training),
                         stacklevel=3)
    buffers = sorted({join_path(root, b) for d in decisions if d.site.mask_proof for b in d.site.mask_proof.buffers
                      for root in scope.serves or (scope.root_path,)})
    if buffers:
        report.once.warn(
            f"mask buffers {buffers}",
            f"lhcompile: the attention mask read from the module buffer(s) {', '.join(buffers)} was proven causal "
            "from its values at capture, so its sites run as causal attention (Lighthouse, or SDPA with "
            "is_causal=True) without reading it; if you change the buffer, call lhcompile.restore and apply again",
            stacklevel=3)
    if not scope.training:
        return  # eval graphs are dense by design
    if not decisions:
        seen = [name for g in graphs for name in attention_like_calls(g.module.graph)]
        if seen:
            counts = Counter(seen)
            report.note(f"no sdpa {graph_id}",
                        f"lhcompile: graph {graph_id} has no attention call to rewrite, but calls that look like "
                        f"attention: {', '.join(f'{name} x{c}' for name, c in counts.items())}. lhcompile rewrites "
                        "scaled_dot_product_attention, varlen_attn, FlexAttention and lhcompile.document_attention "
                        f"only: {_switch_to_sdpa(scope.model or scope.root)}", stacklevel=3)
        return
    for g in graphs:
        if g.calls > 1 and g.sites:
            report.once.warn(f"shared {g.label}",
                             f"lhcompile: {g.label} is the body of {g.calls} calls: its attention sites are decided "
                             "and rewritten once for all of them, so dense_layers and filter_fn cannot tell those "
                             "calls apart", stacklevel=3)
    dynamic = [d for d in decisions if any(r.startswith(DYNAMIC) for r in d.reasons)]
    if dynamic:
        report.once.warn("dynamic length",
                         f"lhcompile: graph {graph_id} was captured with a dynamic sequence length (mark_dynamic, "
                         f"dynamic=True, or Dynamo's automatic dynamic shapes), so {len(dynamic)} of its attention "
                         "sites stay dense: Lighthouse over one sequence needs a static length (per packed document "
                         f"it does not). First: {dynamic[0].site.module_path or '<top>'}: {dynamic[0].reasons[-1]}",
                         stacklevel=3)
    asked = [d for d in decisions if d.rotation is not None]
    declined = [d for d in asked if isinstance(d.rotation, str)]
    if declined:
        report.once.warn(
            "rope",
            f"lhcompile: rope='after_selection', but at {len(declined)} of {len(asked)} Lighthouse sites of graph "
            f"{graph_id} no RoPE rotation was recognised upstream of query and key, so they pool rotated q and k in "
            f"the paper's order (harmless in a model without RoPE): {declined[0].site.module_path or '<top>'}: {declined[0].rotation}", stacklevel=3)


def warn_if_nothing_rewritten(report: Report, rows: list[SiteReport], stacklevel: int = 3) -> None:
    if rows and not any(s.rewritten for s in rows):
        reasons = Counter(s.reason for s in rows)
        common, count = reasons.most_common(1)[0]
        report.once.warn("nothing rewritten",
                         f"lhcompile: none of the {len(rows)} attention sites was rewritten, so this model trains "
                         f"with dense attention; {'all' if count == len(rows) else f'{count} of them'}: {common}. "
                         "print(lhcompile.inspect(model)) gives every site's reasons", stacklevel=stacklevel)


def _switch_to_sdpa(root: torch.nn.Module | None) -> str:
    if getattr(root, "_supports_sdpa", None) is False:  # a transformers model that refuses "sdpa"
        return (f"transformers runs {type(root).__name__} with eager (or flex) attention only, since SDPA cannot "
                "compute what its attention adds (e.g. attention sinks, logit softcapping, ALiBi), so this model "
                "cannot be rewritten")
    return ("switch the model to one of them (e.g. Hugging Face: attn_implementation='sdpa' or 'causal_sdpa'; "
            "torchtitan: its flex or varlen attention)")


def _mode_guess(graph_id: int, total: int, training: bool) -> str:
    taken = ("with gradients enabled, so it is taken for training: its eligible attention sites run Lighthouse, "
             "also when it serves an evaluation pass run without torch.no_grad()") if training else (
             f"with gradients disabled, so it is taken for evaluation: its {total} attention sites stay dense, also "
             "if it is a training forward")
    return (f"lhcompile.backend: graph {graph_id} was captured {taken}. The backend never sees the module's "
            "train/eval mode; run evaluation under torch.no_grad() or torch.inference_mode(), or use "
            "lhcompile.apply(model), which follows model.train() / model.eval() at every call")
