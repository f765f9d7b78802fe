"""lhcompile as a torch.compile backend: the Lighthouse pass on each captured graph, then the chosen compiler."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .ddp_buckets import bucket_numbering, in_ddp_split
from .document_probe import INSTEAD, VARIANTS
from .lighthouse_pass import Scope, rewrite_graph
from .options import Options
from .passes import erase_unused, prune_unused_inputs
from .report import Report


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
    ``report`` may be shared between backends.
    """

    def __init__(self, options: Options, scope: Scope | None = None, report: Report | None = None) -> None:
        self.options = options
        self.scope = scope
        self.report = report if report is not None else Report()
        self._runs = 0
        self._splits: dict = {}
        """DDP split graphs seen, with their buckets' numbering (see ``ddp_buckets``)."""

    @property
    def documents(self) -> bool:
        """Whether a site of the graphs captured so far runs Lighthouse per document (its lengths are data)."""
        return any(s.rewritten and s.documents for s in self.report.sites)

    @property
    def runs(self) -> int:
        """Calls of the graphs compiled so far (a model call that ran none ran eagerly, its attention dense)."""
        return self._runs

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        scope = self.scope or Scope(training=torch.is_grad_enabled(), eval_reason=_GRAD_OFF, mode_from_grad=True)
        numbering = bucket_numbering(gm, self._splits)
        if numbering is None and in_ddp_split():
            self.report.once.warn("ddp split", "lhcompile: DistributedDataParallel split the model's graph into "
                                  "gradient buckets, and the graph holding all of them was not found, so dense_layers "
                                  "counts the attention sites of each bucket on its own; set "
                                  "torch._dynamo.config.optimize_ddp = False, or keep dense layers with filter_fn")
        rewritten = rewrite_graph(gm, self.options, self.report, scope, numbering)
        # a causal mask that Lighthouse sites no longer read is N x N: drop it, also where it fed an activation-
        # checkpointed layer. A module's restore recaptures its graph; only a GraphModule rewritten in place (apply
        # on a GraphModule, not this backend) keeps its mask nodes, for restore_sites
        erase_unused(rewritten.read + prune_unused_inputs(gm))
        compiled = self.options.compile(gm, example_inputs)
        probe = rewritten.probe
        # batches that need less than Lighthouse per document run their own graph: the graph as captured (short
        # documents only: dense within documents, the model's own kernel), the graph on document_attention (short
        # documents where it is faster) or plain Lighthouse (a document per row). In static shapes each compiles at
        # its first batch, with that batch for example: a run whose batches never need one does not pay its compile
        # (a small Llama on CPU: 11 s for two such graphs beside 14 s for the rewritten one). Under data parallelism
        # the rank that meets such a batch first compiles while the others wait for it, once
        pending = dict(rewritten.variants) if _static(example_inputs) else {}
        variants = {name: self._compile_variant(name, variant, example_inputs)
                    for name, variant in rewritten.variants.items() if name not in pending}

        def serving(name: str, args: tuple) -> str:
            """The graph that serves a batch that needs ``name``: its own where that compiled, else ``INSTEAD``'s."""
            if name in pending:
                variants[name] = self._compile_variant(name, pending.pop(name), list(args))
            return name if variants.get(name) is not None or name not in INSTEAD else serving(INSTEAD[name], args)

        def run(*args: Any) -> Any:
            self._runs += 1
            if probe is not None:
                name = serving(probe.variant(args), args)
                variant = variants.get(name)
                if variant is not None:
                    self.report.variant_calls[name] = self.report.variant_calls.get(name, 0) + 1
                    return variant(*args)
            return compiled(*args)

        return run

    def _compile_variant(self, name: str, variant: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable | None:
        try:
            return self.options.compile(variant, example_inputs)
        except Exception as err:  # a shortcut for some batches must never stop a model that trains without it
            held, graph = VARIANTS[name]
            instead = f"the graph {VARIANTS[INSTEAD[name]][1]} where that compiled, else " if name in INSTEAD else ""
            self.report.once.warn(
                f"variant {name}", f"lhcompile: the graph {graph}, for batches with {held}, did not compile "
                f"({type(err).__name__}: {err}); those batches run {instead}Lighthouse per document")
            return None
