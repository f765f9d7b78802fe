"""The Lighthouse pass over one captured graph, in three steps over one record per attention site.

1. ``decide`` (pure): every site of the graph and of the bodies nested in it (activation checkpointing,
   invoke_subgraph), of every kind (``passes.kinds``), gets a ``Decision``: its position in execution order, every
   reason it stays dense per layer block it serves, and its RoPE rotation;
2. ``report``: the report's rows and the warnings are computed from the decisions;
3. ``rewrite``: the decisions are applied, each replacement built by the placement from the site's SDPA-layout
   inputs and documents.
Whatever the pass declines, it says why: in the report, and as a warning when it leaves a model dense.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx

from .blocks import Block, compiled_alone, join_path
from .ddp_buckets import Numbering
from .debug import dump_graph
from .document_probe import AS_CAPTURED, DENSE, DOCUMENTS, ROWS, DocumentProbe
from .documents import dense_documents, starts_of
from .options import Options
from .placements import Inputs, SingleDevice
from .passes import (DocumentSource, Proofs, RopeMatch, Site, attention_like_calls, copy_with_bodies, erase_unused,
                     find_qk_rotation, find_sites, prune_unused_inputs, rewrite_sites, subgraph_calls, unrotated)
from .passes.meta import lifted_tensor, source_name, user_path
from .report import Report, SiteReport
from .rotary import Rotary


@dataclass(frozen=True)
class Scope:
    """What a captured graph stands for."""

    training: bool
    """The mode it was captured for: eval graphs keep every site dense."""
    eval_reason: str = "module is in eval mode (Lighthouse is for training; dense attention is used)"
    mode_from_grad: bool = False
    """``training`` was taken from grad mode at capture (lhcompile.backend never sees the module): a guess."""
    root: torch.nn.Module | None = None
    """The module compiled with it; a site path that does not resolve in it means a graph of a submodule."""
    blocks: tuple[Block, ...] = ()
    """The modules of the layer stack it serves (one graph per kind of layer), or () for the root's own graph."""
    model: torch.nn.Module | None = None
    """The model ``apply`` was called on (the root, or the model of the blocks)."""


@dataclass
class _Graph:
    """A graph the pass works on: the captured one, or a body nested in it."""

    module: fx.GraphModule
    label: str
    sites: list[Site]
    at: tuple[int, ...]
    """Where it runs: the positions of the calls that lead to it, from the captured graph down."""
    position: dict[fx.Node, int]
    calls: int = 1

    def order(self, site: Site) -> tuple[int, ...]:
        """A key that sorts sites of all graphs into execution order."""
        return (*self.at, self.position[site.node])


def _graphs(gm: fx.GraphModule, label: str, resolve: dict[fx.Node, fx.Node], proofs: Proofs,
            at: tuple[int, ...] = ()) -> Iterator[_Graph]:
    """gm, then every body nested in it (depth first, in call order), each body once (at its first call)."""
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    yield _Graph(gm, label, find_sites(gm.graph, resolve.get, proofs), at, position)
    calls = subgraph_calls(gm)
    uses = Counter(call.name for call in calls)
    for call in calls:
        count = uses.pop(call.name, None)
        if count is None:  # a later call of a body already walked
            continue
        if call.inputs:
            resolve.update(call.inputs)
        for nested in _graphs(call.module, f"{label}.{call.name} ({call.op})", resolve, proofs,
                              (*at, position[call.call])):
            nested.calls *= count
            yield nested


@dataclass
class Decision:
    """What the pass does with one site: decided once, reported from, applied by the rewrite."""

    graph: _Graph
    site: Site
    position: int
    """Among the sites of the whole captured graph, in execution order (what ``dense_layers`` counts)."""
    rows: list[tuple[int, str, list[str]]]
    """Per layer block the graph serves (one for the model's own graph): the site's place among the model's sites,
    its path and every reason it stays dense there (none: Lighthouse). The first block decides for the graph that
    serves them all."""
    rotation: tuple[RopeMatch, RopeMatch] | str | None = None
    """With rope='after_selection', at a Lighthouse site: the rotation found, or why none was."""

    @property
    def lighthouse(self) -> bool:
        return not self.rows[0][2]

    def rewrites(self, options: Options) -> bool:
        return self.lighthouse or options.placement.rewrites_dense or self.site.causal_proven


def decide(graphs: list[_Graph], options: Options, scope: Scope, numbering: Numbering | None) -> list[Decision]:
    """Every site's decision, in execution order; raises where the graph cannot be handled at all."""
    sites = sorted(((g, site) for g in graphs for site in g.sites), key=lambda gs: gs[0].order(gs[1]))
    first, total = (numbering.first, numbering.total) if numbering else (0, len(sites))
    missing = [s for _, s in sites if s.problem is None and s.q_shape is None]
    if missing:
        raise ValueError(
            f"lhcompile: the graph has no shape metadata for the attention call {missing[0].node.name!r} (module "
            f"{missing[0].module_path or '<top>'!r}); pass example_inputs= to lhcompile.apply, or capture the graph "
            "with torch.export / torch.compile, which record shapes")
    decisions = []
    for position, (g, site) in enumerate(sites, start=first):
        options.placement.check(site)
        # a block's graph holds its layer's sites: the model's sites before them are those of the layers before
        rows = [(block.layer * total + position if block else position,
                 path := join_path(block.path if block else "", site.module_path),
                 _reasons(site, position, total, options, scope, block, path)) for block in scope.blocks or (None,)]
        decision = Decision(g, site, position, rows)
        if decision.lighthouse and site.documents is None and _dynamic_length(site):
            # one document per row: Lighthouse per document runs any length, Lighthouse over one sequence does not
            site.documents = DocumentSource("whole_rows", (site.q,), "one per row, at a dynamic sequence length")
        if decision.lighthouse and options.config.rope == "after_selection":
            decision.rotation = find_qk_rotation(site.q, site.k, site.q_shape[2]) if site.kind.rope else \
                f"RoPE after selection is not available for {site.op} (its tokens are rows laid end to end)"
        decisions.append(decision)
    return decisions


def _reasons(site: Site, position: int, total: int, options: Options, scope: Scope, block: Block | None,
             path: str) -> list[str]:
    """Every reason this site stays dense (empty: rewrite it)."""
    config, reasons = options.config, []
    if site.problem:
        reasons.append(site.problem + _advice(site, scope))
    if not scope.training:
        reasons.append(scope.eval_reason)
    if block is not None:
        if block.dense_reason:
            reasons.append(block.dense_reason)
    elif position in config.dense_indices(total):
        reasons.append(f"dense layer (site {position} is in dense_layers={config.dense_layers})")
    if options.filter_fn is not None and not options.filter_fn(path):
        reasons.append("excluded by filter_fn")
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


def _advice(site: Site, scope: Scope) -> str:
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


def report_rows(decisions: list[Decision], graph_id: int, options: Options, scope: Scope) -> list[SiteReport]:
    """The report's rows: one per site and layer block."""
    rows = []
    for d in decisions:
        site = d.site
        kv_heads = site.k_shape[1] if site.k_shape and len(site.k_shape) == 4 else None
        for index, path, reasons in d.rows:
            rows.append(SiteReport(graph_id, index, path, site.op, site.q_shape, kv_heads, not reasons,
                                   _reason(d, reasons, options), scope.training, site.documents is not None))
    return rows


def _reason(d: Decision, reasons: list[str], options: Options) -> str:
    site = d.site
    if not reasons:
        documents = f" per document ({site.documents.description})" if site.documents else ""
        return f"lighthouse{documents}{_rope_note(d.rotation, site)}"
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


def rewrite(decisions: list[Decision], options: Options, batches: str = DOCUMENTS) -> list[fx.Node]:
    """Apply the decisions; returns the nodes the replaced calls read (see ``passes.erase_unused``). ``batches``:
    the ``document_probe`` graph to build: ``DOCUMENTS`` (any batch), ``ROWS`` (one document per row: every
    Lighthouse site as plain causal attention) or ``DENSE`` (no long document: every Lighthouse site as
    ``document_attention``)."""
    read: list[fx.Node] = []
    by_graph: dict[fx.GraphModule, list[Decision]] = {}
    for d in decisions:
        if d.rewrites(options):
            by_graph.setdefault(d.graph.module, []).append(d)
    for module, chosen in by_graph.items():
        decision = {d.site.node: d for d in chosen}
        read += rewrite_sites(module, [d.site for d in chosen],
                              lambda site, args: _replacement(decision[site.node], args, options, batches))
    return read


def _replacement(d: Decision, args: dict[str, Any], options: Options, batches: str) -> Any:
    """What replaces a site: the placement's Lighthouse or dense attention on the site's SDPA-layout inputs."""
    site, placement = d.site, options.placement
    tracer = next(a for a in args.values() if isinstance(a, fx.Proxy)).tracer
    q, k, v = site.kind.inputs(site, args)
    scale = site.kind.scale(site, args)
    # a dynamic length is read from the graph at run time, never written in as the tracer's symbol
    batch, length = (size if isinstance(size, int) else q.size(dim) for dim, size in ((0, site.q_shape[0]),
                                                                                     (2, site.q_shape[2])))
    head_dim = site.q_shape[3]
    scale = (head_dim ** -0.5 if isinstance(head_dim, int) else q.size(3) ** -0.5) if scale is None else scale
    starts = None
    if site.documents is not None and not (batches == ROWS and d.lighthouse):
        starts = starts_of(site.documents.form, [fx.Proxy(t, tracer) for t in site.documents.tensors], batch, length)
    if not d.lighthouse:
        return site.kind.output_from(site, placement.dense(site, Inputs(q, k, v, scale, starts, batch, length)), args)
    if batches == DENSE:
        return site.kind.output_from(site, dense_documents(q, k, v, starts, batch=batch, length=length, scale=scale),
                                     args)
    rotary = None
    if isinstance(d.rotation, tuple):
        q, k, rotary = _unrotated(site, d.rotation, tracer)
    out = placement.lighthouse(site, Inputs(q, k, v, scale, starts, batch, length), options.config, rotary)
    return site.kind.output_from(site, out, args)


def _unrotated(site: Site, rotation: tuple[RopeMatch, RopeMatch], tracer: Any) -> tuple[Any, Any, Rotary]:
    """Query and key as they were before the model's rotation, and its tables."""
    mq, mk = rotation
    tables = [fx.Proxy(t, tracer) for t in mq.tables]
    rotary = Rotary.from_model_tables(mq.form, mq.rotary_dim, site.q_shape[3], tables, mq.table_position_axis,
                                      mq.table_shape)
    return fx.Proxy(unrotated(mq), tracer), fx.Proxy(unrotated(mk), tracer), rotary


@dataclass(frozen=True)
class Rewritten:
    """What the pass did to a graph, for the backend that compiles it."""

    read: list[fx.Node]
    """The nodes the rewritten calls read (see ``passes.erase_unused``)."""
    probe: DocumentProbe | None
    """Where every Lighthouse site runs per document: how to tell, before the rewritten graph runs, a batch that
    needs less (``lhcompile.document_probe``)."""
    variants: dict[str, fx.GraphModule]
    """With a probe, the graphs for such batches, each with its own bodies, by the probe's name for them: the graph
    as it was captured, where the probe chooses by the documents' lengths the graph rewritten for
    ``document_attention``, and where it can tell one document per row the graph rewritten for that."""


def rewrite_graph(gm: fx.GraphModule, options: Options, report: Report, scope: Scope,
                  numbering: Numbering | None = None, variants: bool = True) -> Rewritten:
    """The pass on gm and the bodies nested in it: decide, report, rewrite, warn. ``dense_layers`` counts the sites
    in execution order (or, for blocks, the layers), among the sites of the whole graph that gm was split from when
    ``numbering`` says where gm's stand (DDP buckets). ``variants``: also build the graphs for batches that need
    less than Lighthouse per document (for a backend that chooses per call)."""
    graph_id = report.graphs
    report.graphs += 1
    resolve: dict[fx.Node, fx.Node] = {}
    graphs = list(_graphs(gm, f"graph {graph_id}", resolve, {}))
    decisions = decide(graphs, options, scope, numbering)
    lighthouse = [d.site for d in decisions if d.lighthouse]
    probe = DocumentProbe.of(gm, [d.site for d in decisions], lighthouse, resolve.get,
                             options.config.min_lighthouse_len, isinstance(options.placement, SingleDevice)
                             ) if lighthouse and variants else None
    others = {} if probe is None else {AS_CAPTURED: copy_with_bodies(gm)}
    for name, wanted in ((DENSE, probe is not None and probe.dense), (ROWS, probe is not None and probe.rows_known)):
        if wanted:
            others[name] = _rewritten_for(name, copy_with_bodies(gm), graph_id, options, scope, numbering)
    if scope.root is not None:
        _warn_if_captured_below(gm, scope.root, [d.site for d in decisions], report)
    before = gm.print_readable(print_output=False) if options.debug else ""
    report.sites += report_rows(decisions, graph_id, options, scope)
    read = rewrite(decisions, options)
    _warn_about_rope(decisions, graph_id, report)
    total = numbering.total if numbering else len(decisions)
    if (numbering.first if numbering else 0) + len(decisions) == total:
        # the whole graph is decided (a DDP split: at its last bucket with sites); its rows, buckets' included
        rows = report.sites[len(report.sites) - total * len(scope.blocks or (None,)):]
        _warn_about(graphs, graph_id, total, options, scope, report, rows)
    if options.debug:
        dump_graph(graph_id, before, gm.print_readable(print_output=False), report)
    return Rewritten(read, probe, others)


def _rewritten_for(batches: str, gm: fx.GraphModule, graph_id: int, options: Options, scope: Scope,
                   numbering: Numbering | None) -> fx.GraphModule:
    """gm rewritten with the same decisions for the probe's ``batches`` (see ``rewrite``); decided again on the
    copy's own nodes, reported and warned about once, for gm."""
    graphs = list(_graphs(gm, f"graph {graph_id}", {}, {}))
    erase_unused(rewrite(decide(graphs, options, scope, numbering), options, batches) + prune_unused_inputs(gm))
    return gm


def _warn_about_rope(decisions: list[Decision], graph_id: int, report: Report) -> None:
    asked = [d for d in decisions if d.rotation is not None]
    declined = [d for d in asked if isinstance(d.rotation, str)]
    if declined:
        report.once.warn(
            "rope",
            f"lhcompile: rope='after_selection', but at {len(declined)} of {len(asked)} Lighthouse sites of graph "
            f"{graph_id} no RoPE rotation was recognised upstream of query and key, so they pool rotated q and k in "
            f"the paper's order (harmless in a model without RoPE): {declined[0].site.module_path or '<top>'}: "
            f"{declined[0].rotation}")


def _warn_about(graphs: list[_Graph], graph_id: int, total: int, options: Options, scope: Scope,
                report: Report, rows: list[SiteReport]) -> None:
    """Say what this graph left undone, or took on a guess, that a user would not see otherwise."""
    if scope.mode_from_grad and total:
        report.once.warn(f"mode from grad {scope.training}", _mode_guess(graph_id, total, scope.training))
    buffers = sorted({join_path(block.path if block else "", b) for g in graphs for site in g.sites if site.mask_proof
                      for b in site.mask_proof.buffers for block in scope.blocks or (None,)})
    if buffers:
        report.once.warn(  # once per graph: each kind of layer has its own
            f"mask buffers {buffers}",
            f"lhcompile: the attention mask read from the module buffer(s) {', '.join(buffers)} was proven causal "
            "from its values at capture, so its sites run as causal attention (Lighthouse, or SDPA with "
            "is_causal=True) without reading it; if you change the buffer, call lhcompile.restore and apply again")
    if not scope.training:
        return  # eval graphs are dense by design
    if total == 0:
        seen = [name for g in graphs for name in attention_like_calls(g.module.graph)]
        if seen:
            counts = Counter(seen)
            note = (f"lhcompile: graph {graph_id} has no attention call to rewrite, but calls that look like "
                    f"attention: {', '.join(f'{name} x{c}' for name, c in counts.items())}. lhcompile rewrites "
                    "scaled_dot_product_attention, varlen_attn, FlexAttention and lhcompile.document_attention only: "
                    f"{_switch_to_sdpa(scope.model or scope.root)}")
            report.notes.append(note)
            report.once.warn(f"no sdpa {graph_id}", note)
        return
    for g in graphs:
        if g.calls > 1 and g.sites:
            report.once.warn(f"shared {g.label}",
                             f"lhcompile: {g.label} is the body of {g.calls} calls: its attention sites are decided "
                             "and rewritten once for all of them, so dense_layers and filter_fn cannot tell those "
                             "calls apart")
    if not scope.blocks:
        outside = [i for i in options.config.dense_layers if not -total <= i < total]
        if outside:
            report.once.warn("dense_layers range",
                             f"lhcompile: dense_layers entries {outside} are outside the {total} attention sites of "
                             f"graph {graph_id}; they keep nothing dense")
    dynamic = [s for s in rows if s.reason.startswith(DYNAMIC)]
    if dynamic:
        report.once.warn("dynamic length",
                         f"lhcompile: graph {graph_id} was captured with a dynamic sequence length (mark_dynamic, "
                         f"dynamic=True, or Dynamo's automatic dynamic shapes), so {len(dynamic)} of its attention "
                         "sites stay dense: Lighthouse over one sequence needs a static length (per packed document "
                         f"it does not). First: {dynamic[0].module_path or '<top>'}: {dynamic[0].reason}")
    if scope.model is None:  # apply says it after the model's call, when every kind of layer has been captured
        warn_if_nothing_rewritten(report, rows)


def warn_if_nothing_rewritten(report: Report, rows: list[SiteReport]) -> None:
    if rows and not any(s.rewritten for s in rows):
        report.once.warn("nothing rewritten",
                         "lhcompile: no attention site was rewritten, so this model trains with dense attention. "
                         f"Every reason, per site:\n{report.table(rows)}", stacklevel=3)


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


def _traced_from_submodule(gm: fx.GraphModule, root: torch.nn.Module) -> bool:
    """Whether Dynamo traced gm from a submodule's own frame: its parameters, lifted from that frame's self, have
    other paths there than in root (after a graph break inside a layer, or a layer compiled on its own)."""
    paths: dict[int, set[str]] = {}  # a tied tensor (shared embeddings) has several
    for name, t in (*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)):
        paths.setdefault(id(t), set()).add(name)
    for node in gm.graph.nodes:
        name = source_name(node) if node.op == "placeholder" else None
        tensor = lifted_tensor(node) if name and name.startswith("L['self']") else None
        if tensor is not None and id(tensor) in paths:
            return user_path(name) not in paths[id(tensor)]
    return False


def _warn_if_captured_below(gm: fx.GraphModule, root: torch.nn.Module, sites: list[Site], report: Report) -> None:
    site = next((site for site in sites if _module(root, site) is None), None)
    if site is None and sites and _traced_from_submodule(gm, root):
        site = sites[0]
    if site is None:
        return
    alone = [path for path, module in root.named_modules() if path and compiled_alone(module)]
    if alone:
        cause = (f"{', '.join(alone[:3])} {'is' if len(alone) == 1 else 'are'} compiled on its own (its own compile, "
                 "or fully_shard outside the items of a ModuleList/ModuleDict of layers: Dynamo does not trace its hooks) "
                 "and Dynamo may reuse one graph for every module of its class. fully_shard the layers of the layer "
                 "stack (lhcompile then compiles each kind of layer itself), or only the root")
    else:
        breaks = list(torch._dynamo.utils.counters["graph_break"])
        seen = f" (Dynamo's last reason: {breaks[-1].splitlines()[0]})" if breaks else ""
        cause = (f"Dynamo broke the graph in {type(root).__name__}'s forward on code it cannot trace{seen}, then "
                 "traced the rest from inside a submodule's own frame; TORCH_LOGS=graph_breaks shows where. Make that code "
                 "traceable (e.g. a RoPE that recomputes its tables from the sequence length at run time), or "
                 "compile with fullgraph=True to see the first break as an error")
    report.once.warn(
        "captured below",
        f"lhcompile: the attention call of {site.module_path!r} was captured in a graph of one submodule, not of "
        f"{type(root).__name__}: {cause}. Such a graph may serve several layers, so dense_layers and filter_fn see "
        "one site per graph, with paths relative to that submodule, and cannot tell the layers apart")
