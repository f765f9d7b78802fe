"""The Lighthouse pass over one captured graph: decide every SDPA site, report it, rewrite the chosen ones.

Sites inside the bodies of higher-order ops (activation checkpointing, invoke_subgraph) are found, decided and
rewritten like the others; a mask that enters such a body from outside is proven causal in the enclosing graph.
Whatever the pass declines, it says why: in the report, and as a warning when it leaves a model dense.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx

from .blocks import Block, compiled_alone, join_path
from .ddp_buckets import Numbering
from .debug import dump_graph
from .options import Options
from .passes import (Proofs, RopeMatch, SdpaSite, attention_like_calls, find_qk_rotation, find_sdpa_sites,
                     rewrite_sdpa, subgraph_calls, unrotated)
from .passes.meta import lifted_tensor, source_name, user_path
from .report import LighthouseWarning, Report, SiteReport
from .rotary import Rotary


@dataclass(frozen=True)
class Scope:
    """What a captured graph stands for."""

    training: bool
    """The mode it was captured for: eval graphs keep every site dense."""
    eval_reason: str = "module is in eval mode (Lighthouse is for training; dense SDPA is used)"
    mode_from_grad: bool = False
    """``training`` was taken from grad mode at capture (lhcompile.backend never sees the module): a guess."""
    root: torch.nn.Module | None = None
    """The module compiled with it; a site path that does not resolve in it means a graph of a submodule."""
    blocks: tuple[Block, ...] = ()
    """The modules of the layer stack it serves (one graph per kind of layer), or () for the root's own graph."""


@dataclass
class _Graph:
    """A graph the pass works on: the captured one, or a body nested in it, with how its inputs resolve."""

    module: fx.GraphModule
    label: str
    sites: list[SdpaSite]
    at: tuple[int, ...]
    """Where it runs: the positions of the calls that lead to it, from the captured graph down."""
    position: dict[fx.Node, int]
    """Each node's position in the graph."""
    calls: int = 1

    def order(self, site: SdpaSite) -> tuple[int, ...]:
        """A key that sorts sites of all graphs into execution order."""
        return (*self.at, self.position[site.node])


def _graphs(gm: fx.GraphModule, label: str, resolve: dict[fx.Node, fx.Node], proofs: Proofs,
            at: tuple[int, ...] = ()) -> Iterator[_Graph]:
    """gm, then every body nested in it (depth first, in call order), each body once (at its first call)."""
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    yield _Graph(gm, label, find_sdpa_sites(gm.graph, resolve.get, proofs), at, position)
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


def _module_class(site: SdpaSite) -> type | None:
    stack = site.node.meta.get("nn_module_stack")
    return list(stack.values())[-1][1] if stack else None


def _module(root: torch.nn.Module | None, site: SdpaSite) -> torch.nn.Module | None:
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


def _advice(site: SdpaSite, scope: Scope) -> str:
    """What to do about a site that can never be rewritten, where we know."""
    cls = _module_class(site)
    module = _module(scope.root, site)
    if site.problem.startswith("explicit attn_mask is computed from the graph's inputs") and cls is not None \
            and getattr(cls, "__module__", "").startswith("transformers.") \
            and getattr(module, "is_causal", True):
        return ("; if it is plainly causal (no padding, no sliding window shorter than the sequence), "
                "attn_implementation='causal_sdpa' (import lhcompile.hf) calls SDPA with is_causal=True instead, "
                "and keeps the model's own sdpa path where the mask is not plainly causal")
    return ""


def _reasons(site: SdpaSite, position: int, total: int, options: Options, scope: Scope, block: Block | None,
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
    if n is not None and not isinstance(n, int):
        reasons.append(f"sequence length is dynamic ({n}); Lighthouse needs a static length")
    elif n is not None and (problem := options.target.problem(config, n)):
        reasons.append(problem)
    return reasons


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"F.{target.__name__}"


def rewrite_graph(gm: fx.GraphModule, options: Options, report: Report, scope: Scope,
                  numbering: Numbering | None = None) -> list[fx.Node]:
    """Rewrite the eligible SDPA sites of gm (and of the bodies nested in it) in place and add every site, with
    its fate, to report; ``dense_layers`` counts the sites in execution order (or, for blocks, the layers), among
    the sites of the whole graph that gm was split from when ``numbering`` says where gm's stand (DDP buckets).
    Returns the nodes the rewritten calls read (see ``passes.erase_unused``)."""
    graph_id = report.graphs
    report.graphs += 1
    graphs = list(_graphs(gm, f"graph {graph_id}", {}, {}))
    sites = sorted(((g, site) for g in graphs for site in g.sites), key=lambda gs: gs[0].order(gs[1]))
    first, total = (numbering.first, numbering.total) if numbering else (0, len(sites))
    missing = [s for _, s in sites if s.problem is None and s.q_shape is None]
    if missing:
        raise ValueError(
            f"lhcompile: the graph has no shape metadata for the SDPA call {missing[0].node.name!r} "
            f"(module {missing[0].module_path or '<top>'!r}); pass example_inputs= to lhcompile.apply, or capture "
            "the graph with torch.export / torch.compile, which record shapes"
        )
    if scope.root is not None and not scope.blocks:
        _warn_if_captured_below(gm, scope.root, [s for _, s in sites], report)
    before = gm.print_readable(print_output=False) if options.debug else ""
    scopes: tuple[Block | None, ...] = scope.blocks or (None,)  # None: the graph is the compiled module's own
    lighthouse: set[int] = set()
    rotations: dict[int, tuple[RopeMatch, RopeMatch] | str] = {}
    for position, (g, site) in enumerate(sites, start=first):
        options.target.check(site)
        decided = [(path := join_path(block.path if block else "", site.module_path),
                    _reasons(site, position, total, options, scope, block, path)) for block in scopes]
        if not decided[0][1]:  # the first block decides for the graph that serves them all
            lighthouse.add(id(site))
            if options.config.rope == "after_selection":
                rotations[id(site)] = find_qk_rotation(site.q, site.k, site.q_shape[2])
        kv_heads = site.k_shape[1] if site.k_shape and len(site.k_shape) == 4 else None
        rewritten = "lighthouse" + _rope_note(rotations.get(id(site)), site)
        for path, reasons in decided:
            reason = "; ".join(reasons) + options.target.dense_note if reasons else rewritten
            if reasons and site.causal_mask and not options.target.rewrites_dense:
                reason += "; its mask is the causal mask, so it runs as SDPA with is_causal=True"
            report.sites.append(SiteReport(graph_id, position, path, _op_name(site.node.target), site.q_shape,
                                           kv_heads, not reasons, reason, scope.training))
    read: list[fx.Node] = []
    for g in graphs:
        chosen = [s for s in g.sites if id(s) in lighthouse or options.target.rewrites_dense or s.causal_mask]

        def build(site: SdpaSite, args: dict[str, Any]) -> fx.Proxy:
            if id(site) in lighthouse:
                rotation = rotations.get(id(site))
                if not isinstance(rotation, tuple):
                    return options.target.lighthouse(site, args, options.config, None)
                args, rotary = _unrotated_inputs(site, args, *rotation)
                return options.target.lighthouse(site, args, options.config, rotary)
            return options.target.dense(site, args)

        if chosen:
            read += rewrite_sdpa(g.module, chosen, build)
    unrecognised = [(s.module_path, why) for _, s in sites if isinstance(why := rotations.get(id(s)), str)]
    if unrecognised:
        _warn_once(report, "rope",
                   f"lhcompile: rope='after_selection', but at {len(unrecognised)} of {len(rotations)} Lighthouse "
                   f"sites of graph {graph_id} no RoPE rotation was recognised upstream of query and key, so they pool "
                   f"rotated q and k in the paper's order (harmless in a model without RoPE): "
                   f"{unrecognised[0][0] or '<top>'}: {unrecognised[0][1]}")
    if first + len(sites) == total:  # the whole graph is decided (a DDP split: at its last bucket with sites)
        # its rows: one per site and block, the split's buckets' rows added one after the other
        rows = report.sites[len(report.sites) - total * len(scopes):]
        _warn_about(graphs, graph_id, total, options, scope, report, rows)
    if options.debug:
        dump_graph(graph_id, before, gm.print_readable(print_output=False), report)
    return read


def _rope_note(rotation: tuple[RopeMatch, RopeMatch] | str | None, site: SdpaSite) -> str:
    if rotation is None:
        return ""
    if isinstance(rotation, str):
        return f"; RoPE before pooling (the paper's order): {rotation}"
    match = rotation[0]
    return f"; RoPE after selection ({match.form}, {match.rotary_dim} of {site.q_shape[3]} dims)"


def _unrotated_inputs(site: SdpaSite, args: dict[str, Any], q: RopeMatch, k: RopeMatch
                      ) -> tuple[dict[str, Any], Rotary]:
    """The call's arguments with query and key as they were before the model's rotation, and its tables."""
    tracer = args["query"].tracer
    args = {**args, "query": fx.Proxy(unrotated(q), tracer), "key": fx.Proxy(unrotated(k), tracer)}
    tables = [fx.Proxy(t, tracer) for t in q.tables]
    return args, Rotary.from_model_tables(q.form, q.rotary_dim, site.q_shape[3], tables, q.table_position_axis,
                                          q.table_shape)


def _warn_once(report: Report, kind: str, message: str) -> None:
    if kind not in report.warned:
        report.warned.add(kind)
        warnings.warn(message, LighthouseWarning, stacklevel=3)


def _warn_about(graphs: list[_Graph], graph_id: int, total: int, options: Options, scope: Scope,
                report: Report, rows: list[SiteReport]) -> None:
    """Say what this graph left undone, or took on a guess, that a user would not see otherwise."""
    if scope.mode_from_grad and total:
        _warn_once(report, f"mode from grad {scope.training}", _mode_guess(graph_id, total, scope.training))
    buffers = sorted({b for g in graphs for site in g.sites if site.mask_proof for b in site.mask_proof.buffers})
    if buffers:
        _warn_once(report, "mask buffers",
                   f"lhcompile: the attention mask read from the module buffer(s) {', '.join(buffers)} was proven "
                   "causal from its values at capture, so its sites run as causal attention (Lighthouse, or SDPA "
                   "with is_causal=True) without reading it; if you change the buffer, call lhcompile.restore and "
                   "apply again")
    if not scope.training:
        return  # eval graphs are dense by design
    if total == 0:
        seen = [name for g in graphs for name in attention_like_calls(g.module.graph)]
        if seen:
            counts = Counter(seen)
            note = (f"lhcompile: graph {graph_id} has no SDPA call to rewrite, but calls that look like attention: "
                    f"{', '.join(f'{name} x{c}' for name, c in counts.items())}. lhcompile rewrites "
                    f"torch.nn.functional.scaled_dot_product_attention only: {_switch_to_sdpa(scope.root)}")
            report.notes.append(note)
            _warn_once(report, f"no sdpa {graph_id}", note)
        return
    shared = [g for g in graphs if g.calls > 1 and g.sites]
    for g in shared:
        _warn_once(report, f"shared {g.label}",
                   f"lhcompile: {g.label} is the body of {g.calls} calls: its SDPA sites are decided and rewritten "
                   "once for all of them, so dense_layers and filter_fn cannot tell those calls apart")
    if not scope.blocks:
        outside = [i for i in options.config.dense_layers if not -total <= i < total]
        if outside:
            _warn_once(report, "dense_layers range",
                       f"lhcompile: dense_layers entries {outside} are outside the {total} SDPA sites of graph "
                       f"{graph_id}; they keep nothing dense")
    # a graph that serves dense layers only rewrites nothing by design; the root's own graph should rewrite some
    expected = any(b.dense_reason is None for b in scope.blocks) if scope.blocks else not report.rewritten
    if expected and not any(s.rewritten for s in rows):
        _warn_once(report, "nothing rewritten",
                   f"lhcompile: no SDPA site was rewritten, so this model trains with dense attention. Every reason, "
                   f"per site:\n{report.table(rows)}")


def _switch_to_sdpa(root: torch.nn.Module | None) -> str:
    if getattr(root, "_supports_sdpa", None) is False:  # a transformers model that refuses "sdpa"
        return (f"transformers runs {type(root).__name__} with eager (or flex) attention only, since SDPA cannot "
                "compute what its attention adds (e.g. attention sinks, logit softcapping, ALiBi), so this model "
                "cannot be rewritten")
    return ("switch the model to SDPA attention (e.g. torchtitan: lhcompile.integrations.torchtitan; Hugging "
            "Face: attn_implementation='sdpa' or 'causal_sdpa')")


def _mode_guess(graph_id: int, total: int, training: bool) -> str:
    taken = ("with gradients enabled, so it is taken for training: its eligible SDPA sites run Lighthouse, also "
             "when it serves an evaluation pass run without torch.no_grad()") if training else (
             f"with gradients disabled, so it is taken for evaluation: its {total} SDPA sites stay dense, also if "
             "it is a training forward")
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


def _warn_if_captured_below(gm: fx.GraphModule, root: torch.nn.Module, sites: list[SdpaSite], report: Report) -> None:
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
    _warn_once(
        report, "captured below",
        f"lhcompile: the SDPA call of {site.module_path!r} was captured in a graph of one submodule, not of "
        f"{type(root).__name__}: {cause}. Such a graph may serve several layers, so dense_layers and filter_fn see "
        "one site per graph, with paths relative to that submodule, and cannot tell the layers apart",
    )
