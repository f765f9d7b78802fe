"""The Lighthouse pass over one captured graph: what each attention site may do, and the graph rewritten for it.

1. ``decide`` (pure): every site of the graph and of the bodies nested in it (activation checkpointing,
   invoke_subgraph), of every kind (``passes.kinds``), gets a ``Decision``: every reason it stays dense whatever
   layer the graph serves (its call, the mode, its length), its documents and its RoPE rotation;
2. a ``Pattern`` says what the sites' places in the model add (``dense_layers``, ``filter_fn``): a graph that serves
   several layers (a layer's graph serves every layer of its class) is rewritten once per pattern it meets;
3. ``rewrite`` applies decisions and pattern, each replacement built by the placement from the site's SDPA-layout
   inputs and documents; ``site_rows`` are the report's rows for the positions a call ran them at.
Whatever the pass declines, it says why: in the report, and as a warning when it leaves a model dense.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..operator.documents import dense_documents, starts_of
from ..operator.rotary import Rotary
from ..passes import DocumentSource, RopeMatch, Site, find_qk_rotation, rewrite_sites, unrotated
from ..report import Report
from .batches import DOCUMENTS, ON_DOCUMENT_ATTENTION, ROWS
from .decision import CapturedGraph, Decision, Pattern, Scope, graphs_of, lighthouse, pattern_of
from .diagnostics import DYNAMIC, advice, site_rows, warn_at_capture, warn_if_nothing_rewritten
from .options import Options
from .placements import Inputs


def decide(graphs: list[CapturedGraph], options: Options, scope: Scope) -> list[Decision]:
    """Every site's decision, in execution order; raises where the graph cannot be handled at all."""
    sites = sorted(((g, site) for g in graphs for site in g.sites), key=lambda gs: gs[0].order(gs[1]))
    missing = [s for _, s in sites if s.problem is None and s.q_shape is None]
    if missing:
        raise ValueError(
            f"lhcompile: the graph has no shape metadata for the attention call {missing[0].node.name!r} (module "
            f"{missing[0].module_path or '<top>'!r}); pass example_inputs= to lhcompile.apply, or capture the graph "
            "with torch.export / torch.compile, which record shapes")
    decisions = []
    for g, site in sites:
        options.placement.check(site)
        mask = site.runtime_mask if options.placement.runtime_masks else None
        reasons = _reasons(site, options, scope, checked_mask=mask is not None)
        documents = site.documents
        if not reasons and documents is None and _dynamic_length(site):
            # one document per row: Lighthouse per document runs any length, Lighthouse over one sequence does not
            documents = DocumentSource("whole_rows", (site.q,), "one per row, at a dynamic sequence length")
        rotation = None
        if not reasons and options.config.rope == "after_selection":
            rotation = find_qk_rotation(site.q, site.k, site.q_shape[2]) if site.kind.rope else \
                f"RoPE after selection is not available for {site.op} (its tokens are rows laid end to end)"
        decisions.append(Decision(g, site, tuple(reasons), documents, rotation, mask))
    return decisions


def _reasons(site: Site, options: Options, scope: Scope, checked_mask: bool = False) -> list[str]:
    """Every reason this site stays dense whatever its place (empty: Lighthouse where its place allows);
    ``checked_mask``: its mask, its only problem, is checked at each call instead."""
    config, reasons = options.config, []
    if site.problem and not checked_mask:
        reasons.append(site.problem + advice(site, scope))
    if not scope.training:
        reasons.append(scope.eval_reason)
    n = site.q_shape[2] if site.q_shape and len(site.q_shape) == 4 else None
    if _dynamic_length(site):
        # per document, any length runs: its documents are data (a plain site's rows become one document each)
        if site.documents is None and not options.placement.any_length:
            reasons.append(f"{DYNAMIC} ({n}): Lighthouse over one sequence needs a static length")
    elif n is not None and (problem := options.placement.problem(config, n)):
        reasons.append(problem)
    return reasons


def _dynamic_length(site: Site) -> bool:
    return bool(site.q_shape) and len(site.q_shape) == 4 and not isinstance(site.q_shape[2], int)


def rewrite(decisions: list[Decision], pattern: Pattern, options: Options, batches: str = DOCUMENTS
            ) -> list[fx.Node]:
    """Apply the decisions at places that add ``pattern``; returns the nodes the replaced calls read (see
    ``passes.erase_unused``). ``batches``: the graph to build (``batches``): ``DOCUMENTS`` (any batch),
    ``ROWS`` (one document per row: every Lighthouse site as plain causal attention) or ``ON_DOCUMENT_ATTENTION``
    (no long document: every Lighthouse site as ``document_attention``)."""
    read: list[fx.Node] = []
    by_graph: dict[fx.GraphModule, list[tuple[Decision, bool]]] = {}
    for d, flags in zip(decisions, pattern):
        chosen = lighthouse(d, flags)
        if chosen or options.placement.rewrites_dense or d.site.causal_proven:
            by_graph.setdefault(d.graph.module, []).append((d, chosen))
    for module, chosen in by_graph.items():
        decision = {d.site.node: (d, lh) for d, lh in chosen}
        read += rewrite_sites(module, [d.site for d, _ in chosen],
                              lambda site, args: _replacement(*decision[site.node], args, options, batches))
    return read


def _replacement(d: Decision, chosen: bool, args: dict[str, Any], options: Options, batches: str) -> Any:
    """What replaces a site: the placement's Lighthouse or dense attention on the site's SDPA-layout inputs."""
    site, placement = d.site, options.placement
    tracer = next(a for a in args.values() if isinstance(a, fx.Proxy)).tracer
    q, k, v = site.kind.inputs(site, args)
    scale = site.kind.scale(site, args)
    # a dynamic length is read from the graph at run time, never written in as the tracer's symbol
    batch, length = (size if isinstance(size, int) else q.size(dim) for dim, size in ((0, site.q_shape[0]),
                                                                                     (2, site.q_shape[2])))
    if _broadcast_batch(site):
        k, v = (t.expand(batch, -1, -1, -1) for t in (k, v))  # SDPA broadcasts key and value of a batch of one
    head_dim = site.q_shape[3]
    scale = (head_dim ** -0.5 if isinstance(head_dim, int) else q.size(3) ** -0.5) if scale is None else scale
    starts = None
    if d.documents is not None and not (batches == ROWS and chosen):
        starts = starts_of(d.documents.form, [fx.Proxy(t, tracer) for t in d.documents.tensors], batch, length)
    if not chosen:
        return site.kind.output_from(site, placement.dense(site, Inputs(q, k, v, scale, starts, batch, length)), args)
    cast = torch.ops.lhcompile.as_sdpa_inputs(q, k, v)  # in an autocast region, SDPA's dtype: one semantics
    q, k, v = cast[0], cast[1], cast[2]
    if batches == ON_DOCUMENT_ATTENTION:
        return site.kind.output_from(site, dense_documents(q, k, v, starts, batch=batch, length=length, scale=scale),
                                     args)
    rotary = None
    if isinstance(d.rotation, tuple):
        q, k, rotary = _unrotated(site, d.rotation, tracer)
        cast = torch.ops.lhcompile.as_sdpa_inputs(q, k, v)
        q, k, v = cast[0], cast[1], cast[2]
    out = placement.lighthouse(site, Inputs(q, k, v, scale, starts, batch, length), options.config, rotary)
    return site.kind.output_from(site, out, args)


def _broadcast_batch(site: Site) -> bool:
    """Whether key and value have a batch of one that SDPA broadcasts over the query's batch (static sizes)."""
    qb, kb = site.q_shape[0], site.k_shape[0] if site.k_shape else None
    return isinstance(qb, int) and kb == 1 and qb != 1


def _unrotated(site: Site, rotation: tuple[RopeMatch, RopeMatch], tracer: Any) -> tuple[Any, Any, Rotary]:
    """Query and key as they were before the model's rotation, and its tables."""
    mq, mk = rotation
    tables = [fx.Proxy(t, tracer) for t in mq.tables]
    rotary = Rotary.from_model_tables(mq.form, mq.rotary_dim, site.q_shape[3], tables, mq.table_position_axis,
                                      mq.table_shape)
    return fx.Proxy(unrotated(mq), tracer), fx.Proxy(unrotated(mk), tracer), rotary


def rewrite_in_place(gm: fx.GraphModule, options: Options, report: Report, scope: Scope) -> None:
    """The pass on a GraphModule, rewritten in place for its own sites (``dense_layers`` counts them in graph order):
    ``apply`` on a GraphModule, given back node for node by ``passes.restore_sites``."""
    graph_id = report.graphs
    report.graphs += 1
    graphs = list(graphs_of(gm, f"graph {graph_id}"))
    decisions = decide(graphs, options, scope)
    warn_at_capture(graphs, decisions, graph_id, scope, report)
    positions = tuple(range(len(decisions)))
    paths = tuple(d.site.module_path for d in decisions)
    pattern = pattern_of(options, positions, paths, len(decisions)) if scope.training else ((),) * len(decisions)
    report.record(site_rows(decisions, pattern, positions, paths, len(decisions), graph_id, options, scope),
                  per_graph=True)
    rewrite(decisions, pattern, options)
    warn_if_nothing_rewritten(report, report.sites)
