"""lhcompile as a torch.compile backend: the Lighthouse pass on each captured graph, then the chosen compiler.

A captured graph becomes a ``_Runner``: at each call it asks where its sites stand in the model (the call's
``lhcompile.calls.Sites``: which positions, so which of them ``dense_layers`` and ``filter_fn`` keep dense) and,
where its Lighthouse sites run per document, what the batch needs (``document_probe``); it runs the graph rewritten
for that, compiled at the first call that needs it (in static shapes; with dynamic shapes at capture, since the
capture's symbolic shapes are needed), and keeps the report's rows of the sites it ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .calls import current_sites
from .ddp_buckets import Numbering, bucket_numbering, in_ddp_split
from ..rewrite.debug import dump_graph, dump_report
from ..rewrite.batches import AS_CAPTURED, DENSE_BATCHES, DOCUMENTS, INSTEAD, VARIANTS
from .probe import DocumentProbe, MaskCheck, MaskProbe
from ..rewrite.decision import Decision, Pattern, Scope, graphs_of, lighthouse, pattern_of
from ..rewrite.diagnostics import site_rows, warn_at_capture
from ..rewrite.lighthouse_pass import decide, rewrite
from ..rewrite.options import Options
from ..passes import copy_with_bodies, erase_unused, prune_unused_inputs
from ..rewrite.placements import SingleDevice
from ..report import Report

_GRAD_OFF = ("captured with gradients disabled, so taken for evaluation (lhcompile.backend decides the mode by grad "
             "mode; lhcompile.apply by the module's train/eval mode)")


def _static(example_inputs: Sequence[Any]) -> bool:
    """Whether a graph's inputs have no symbolic size: any batch's inputs then describe the graph as its capture's
    did, and may stand in for them when it compiles."""
    return not any(isinstance(x, torch.SymInt) or isinstance(x, torch.Tensor) and
                   any(isinstance(d, torch.SymInt) for d in (*x.shape, *x.stride())) for x in example_inputs)


class Backend:
    """Rewrite the attention sites of each graph Dynamo captures, then hand the graph to ``options.compiler``.

    ``scope`` says what the graphs stand for (the mode and module they are captured for); None, as with
    ``lhcompile.backend``, which never sees the module, takes the mode from grad mode at capture: a graph
    captured with gradients disabled is evaluation, and stays dense; that guess is warned about once per mode.
    ``predict``: the patterns the calls of ``scope.root``'s kind of layer will ask for, by number of sites (compiled
    at capture where shapes are dynamic). ``report`` may be shared between backends.
    """

    def __init__(self, options: Options, scope: Scope | None = None, report: Report | None = None,
                 predict: Callable[[int], set[Pattern]] | None = None) -> None:
        self.options = options
        self.scope = scope
        self.report = report if report is not None else Report()
        self.predict = predict
        self.runs = 0
        """Calls of the graphs compiled so far (a model call that ran none ran eagerly)."""
        self._splits: dict = {}
        """DDP split graphs seen, with their buckets' numbering (see ``ddp_buckets``)."""

    @property
    def documents(self) -> bool:
        """Whether a site of the graphs captured so far runs Lighthouse per document (its lengths are data)."""
        return any(s.rewritten and s.documents for s in self.report.sites)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        scope = self.scope or Scope(training=torch.is_grad_enabled(), eval_reason=_GRAD_OFF, mode_from_grad=True)
        numbering = bucket_numbering(gm, self._splits)
        if numbering is None and in_ddp_split() and current_sites() is None:
            self.report.once.warn("ddp split", "lhcompile: DistributedDataParallel split the model's graph into "
                                  "gradient buckets, and the graph holding all of them was not found, so dense_layers "
                                  "counts the attention sites of each bucket on its own; set "
                                  "torch._dynamo.config.optimize_ddp = False, or keep dense layers with filter_fn")
        graph_id = self.report.graphs
        self.report.graphs += 1
        # gm stays as captured: each graph a call needs is a rewritten copy of it
        resolve: dict[fx.Node, fx.Node] = {}
        proofs: dict = {}
        graphs = list(graphs_of(gm, f"graph {graph_id}", resolve, proofs))
        decisions = decide(graphs, self.options, scope)
        warn_at_capture(graphs, decisions, graph_id, scope, self.report)
        eligible = [d.site for d in decisions if d.eligible]
        probe = DocumentProbe.of(gm, [d.site for d in decisions], eligible, resolve.get,
                                 self.options.config.min_lighthouse_len,
                                 isinstance(self.options.placement, SingleDevice)) if eligible else None
        checks = tuple(_check(d) for d in decisions)
        masks = MaskProbe(tuple(n for n in gm.graph.nodes if n.op == "placeholder"), checks, resolve.get) \
            if any(c is not None for c in checks) else None
        runner = _Runner(self, scope, graph_id, gm, decisions, probe, masks, numbering, _static(example_inputs),
                         proofs)
        # the graph for this call compiles now, with the capture's inputs: the others at the call that needs them
        # (static shapes) or now too (dynamic shapes)
        patterns = {runner.pattern(peek=True)[0]}
        if not runner.static and self.predict is not None:
            patterns |= self.predict(len(decisions))
        for pattern in patterns:
            runner.prepare(pattern, list(example_inputs), at_capture=True)
        return runner


def _check(d: Decision) -> MaskCheck | None:
    """What of an eligible site's call is checked at each call: its explicit mask, or its block mask's sparsity."""
    if not d.eligible:
        return None
    if d.mask is not None:
        return MaskCheck(mask=d.mask)
    if d.site.block_tables is not None:
        return MaskCheck(tables=d.site.block_tables, documents=d.site.documents, shape=d.site.q_shape)
    return None


def _graph_paths(gm: fx.GraphModule) -> dict[fx.GraphModule, str]:
    """gm and the bodies nested in it, by their path in gm (a copy's are the same: ``copy_with_bodies``)."""
    return {module: path for path, module in gm.named_modules() if isinstance(module, fx.GraphModule)}


@dataclass
class _Variant:
    compiled: Callable | None
    lighthouse: bool
    """Whether a site runs Lighthouse (else a probe has nothing to choose)."""


class _Runner:
    """One captured graph: runs, per call, the graph rewritten for the call's sites and batch."""

    def __init__(self, backend: Backend, scope: Scope, graph_id: int, pristine: fx.GraphModule,
                 decisions: list[Decision], probe: DocumentProbe | None, masks: MaskProbe | None,
                 numbering: Numbering | None, static: bool, proofs: dict) -> None:
        self.backend, self.scope, self.graph_id = backend, scope, graph_id
        self.options = backend.options
        self.pristine = pristine
        self.decisions = decisions
        self.probe = probe
        self.masks = masks
        self.numbering = numbering
        self.static = static
        paths = _graph_paths(pristine)
        self.proofs = {(paths[node.graph.owning_module], node.name): proof for node, proof in proofs.items()
                       if node.graph.owning_module in paths}
        """The masks proven at capture (by graph and node name): a rewritten copy does not evaluate them again."""
        self.variants: dict[tuple, _Variant] = {}
        self._recorded: set[tuple] = set()
        self._patterns: dict[tuple, Pattern] = {}

    def pattern(self, peek: bool = False, args: Sequence[Any] | None = None
                ) -> tuple[Pattern, tuple[int, ...], tuple[str, ...], int, bool, tuple[str | None, ...] | None]:
        """This call's pattern, its sites' positions, paths and the model's total, whether the positions are
        the model's (else the graph's own: the graph runs outside an applied model's call), and what the masks the
        graph was handed are where they are not the causal mask (read from ``args``)."""
        count = len(self.decisions)
        sites = current_sites()
        taken = None
        if sites is not None and count:
            if peek:
                taken = (sites.positions[sites.taken : sites.taken + count],
                         sites.paths[sites.taken : sites.taken + count])
                taken = taken if len(taken[0]) == count else None
            else:
                taken = sites.take(count)
        if taken is not None:
            positions, paths = taken
            total, model = sites.total, True
        else:
            first, total = (self.numbering.first, self.numbering.total) if self.numbering else (0, count)
            positions = tuple(range(first, first + count))
            paths = tuple(self._path(d) for d in self.decisions)
            model = False
        known = self._patterns.get((positions, total))
        if known is None:  # per place: a graph runs at the same few places call after call
            known = self._patterns[(positions, total)] = pattern_of(self.options, positions, paths, total) \
                if self.scope.training else ((),) * count
        pattern, masks = known, None
        if self.masks is not None and args is not None and self.scope.training:
            masks = self.masks.verdicts(args)
            pattern = tuple(flags + (("mask",) if mask is not None else ()) for flags, mask in zip(pattern, masks))
        return pattern, positions, paths, total, model, masks

    def _path(self, d: Decision) -> str:
        from ..passes.meta import join_path

        return join_path(self.scope.root_path, d.site.module_path)

    def __call__(self, *args: Any) -> Any:
        self.backend.runs += 1
        pattern, positions, paths, total, model, masks = self.pattern(args=args)
        key = (pattern, positions, total, masks)
        if key not in self._recorded:
            self._recorded.add(key)
            self.backend.report.record(site_rows(self.decisions, pattern, positions, paths, total, self.graph_id,
                                                 self.options, self.scope, masks), per_graph=not model)
            if self.options.debug:
                dump_report(self.backend.report)
        variant = self.prepare(pattern, args)
        if variant.lighthouse and self.probe is not None:
            name = self._serving(pattern, self.probe.variant(args), args)
            if name != DOCUMENTS:
                chosen = self.variants[(pattern, name) if name != AS_CAPTURED else (None, AS_CAPTURED)]
                if chosen.compiled is not None:
                    report = self.backend.report
                    if torch._C._current_graph_task_id() == -1:  # a forward, not a checkpoint's recompute
                        report.count_variant(name, *VARIANTS[name], dense=name in DENSE_BATCHES)
                    return chosen.compiled(*args)
        return variant.compiled(*args)

    def prepare(self, pattern: Pattern, args: Sequence[Any], at_capture: bool = False) -> _Variant:
        """The graph rewritten for ``pattern`` (any batch), compiled; with dynamic shapes, at capture, also the
        graphs for batches that need less."""
        key = (pattern, DOCUMENTS)
        if key not in self.variants:
            gm, chosen = self._rewritten(pattern, DOCUMENTS)
            self.variants[key] = _Variant(self.options.compile(gm, args), chosen)
            self.backend.report.compiled += 1
            if at_capture and not self.static and chosen and self.probe is not None:
                for name in self._batch_variants():
                    self._secondary(pattern, name, args)
        return self.variants[key]

    def _batch_variants(self) -> list[str]:
        from ..rewrite.batches import ON_DOCUMENT_ATTENTION, ROWS

        return [AS_CAPTURED, *([ON_DOCUMENT_ATTENTION] if self.probe.dense else []), *([ROWS] if self.probe.rows_known else [])]

    def _serving(self, pattern: Pattern, name: str, args: Sequence[Any]) -> str:
        """The graph that serves a batch that needs ``name``: its own where that compiled, else ``INSTEAD``'s."""
        if name == DOCUMENTS:
            return name
        variant = self._secondary(pattern, name, args) if self.static or self._known(pattern, name) else None
        if variant is not None and variant.compiled is not None:
            return name
        return self._serving(pattern, INSTEAD[name], args) if name in INSTEAD else DOCUMENTS

    def _known(self, pattern: Pattern, name: str) -> bool:
        return ((None, AS_CAPTURED) if name == AS_CAPTURED else (pattern, name)) in self.variants

    def _secondary(self, pattern: Pattern, name: str, args: Sequence[Any]) -> _Variant:
        key = (None, AS_CAPTURED) if name == AS_CAPTURED else (pattern, name)
        if key not in self.variants:
            if name == AS_CAPTURED:
                gm = copy_with_bodies(self.pristine)
            else:
                gm, _ = self._rewritten(pattern, name)
            self.variants[key] = _Variant(self._compile_variant(name, gm, args), False)
        return self.variants[key]

    def _rewritten(self, pattern: Pattern, batches: str) -> tuple[fx.GraphModule, bool]:
        """A copy of the captured graph rewritten for ``pattern`` and ``batches``, and whether a site runs
        Lighthouse in it; decided again on the copy's own nodes."""
        gm = copy_with_bodies(self.pristine)
        names = _graph_paths(gm)
        proofs = {node: self.proofs[(names[module], node.name)] for module in names for node in module.graph.nodes
                  if (names[module], node.name) in self.proofs}
        graphs = list(graphs_of(gm, f"graph {self.graph_id}", proofs=proofs))
        decisions = decide(graphs, self.options, self.scope)
        before = gm.print_readable(print_output=False) if self.options.debug else ""
        # a causal mask that Lighthouse sites no longer read is N x N: drop it, also where it fed an activation-
        # checkpointed layer
        erase_unused(rewrite(decisions, pattern, self.options, batches) + prune_unused_inputs(gm))
        chosen = any(lighthouse(d, flags) for d, flags in zip(decisions, pattern))
        if self.options.debug and batches == DOCUMENTS:
            dump_graph(self.graph_id, before, gm.print_readable(print_output=False), lighthouse=chosen)
        return gm, chosen

    def _compile_variant(self, name: str, variant: fx.GraphModule, args: Sequence[Any]) -> Callable | None:
        try:
            compiled = self.options.compile(variant, list(args))
            self.backend.report.compiled += 1
            return compiled
        except Exception as err:  # a shortcut for some batches must never stop a model that trains without it
            held, graph = VARIANTS[name]
            instead = f"the graph {VARIANTS[INSTEAD[name]][1]} where that compiled, else " if name in INSTEAD else ""
            self.backend.report.once.warn(
                f"variant {name}", f"lhcompile: the graph {graph}, for batches with {held}, did not compile "
                f"({type(err).__name__}: {err}); those batches run {instead}Lighthouse per document")
            return None
