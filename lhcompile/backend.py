"""lhcompile as a torch.compile backend: the Lighthouse pass on each captured graph, then the chosen compiler."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .ddp_buckets import bucket_numbering, in_ddp_split
from .lighthouse_pass import Scope, rewrite_graph
from .options import Options
from .passes import erase_unused, prune_unused_inputs
from .report import LighthouseWarning, Report


_GRAD_OFF = ("captured with gradients disabled, so taken for evaluation (lhcompile.backend decides the mode by grad "
             "mode; lhcompile.apply by the module's train/eval mode)")


class LighthouseBackend:
    """Rewrite the SDPA sites of each graph Dynamo captures, then hand the graph to ``options.compiler``.

    ``scope`` says what the graphs stand for (the mode and module they are captured for); None, as with
    ``lhcompile.backend``, which never sees the module, takes the mode from grad mode at capture: a graph
    captured with gradients disabled is evaluation, and stays dense; that guess is warned about once per mode.
    ``report`` may be shared between backends.
    """

    def __init__(self, options: Options, scope: Scope | None = None, report: Report | None = None) -> None:
        self.options = options
        self.scope = scope
        self.report = report if report is not None else Report()
        self.captures = 0
        """Graphs captured so far (a call with new input shapes that captures none ran eagerly)."""
        self.shapes: set[tuple] = set()
        """Input shapes already called with (kept by the compiled module's call)."""
        self._splits: dict = {}
        """DDP split graphs seen, with their buckets' numbering (see ``ddp_buckets``)."""

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        self.captures += 1
        scope = self.scope or Scope(training=torch.is_grad_enabled(), eval_reason=_GRAD_OFF, mode_from_grad=True)
        numbering = bucket_numbering(gm, self._splits)
        if numbering is None and in_ddp_split() and "ddp split" not in self.report.warned:
            self.report.warned.add("ddp split")
            warnings.warn("lhcompile: DistributedDataParallel split the model's graph into gradient buckets, and the "
                          "graph holding all of them was not found, so dense_layers counts the SDPA sites of each "
                          "bucket on its own; set torch._dynamo.config.optimize_ddp = False, or keep dense layers "
                          "with filter_fn", LighthouseWarning, stacklevel=2)
        read = rewrite_graph(gm, self.options, self.report, scope, numbering)
        # a causal mask that Lighthouse sites no longer read is N x N: drop it, also where it fed an activation-
        # checkpointed layer. A module's restore recaptures its graph; only a GraphModule rewritten in place (apply
        # on a GraphModule, not this backend) keeps its mask nodes, for restore_sdpa
        erase_unused(read + prune_unused_inputs(gm))
        return self.options.compile(gm, example_inputs)
