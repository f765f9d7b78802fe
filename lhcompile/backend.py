"""lhcompile as a torch.compile backend: the Lighthouse pass on each captured graph, then the chosen compiler."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .lighthouse_pass import Scope, rewrite_graph
from .options import Options
from .passes import erase_unused, prune_unused_inputs
from .report import Report


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

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        scope = self.scope or Scope(training=torch.is_grad_enabled(), eval_reason=_GRAD_OFF, mode_from_grad=True)
        read = rewrite_graph(gm, self.options, self.report, scope)
        # a causal mask that Lighthouse sites no longer read is N x N: drop it, also where it fed an activation-
        # checkpointed layer. A module's restore recaptures its graph; only a GraphModule rewritten in place (apply
        # on a GraphModule, not this backend) keeps its mask nodes, for restore_sdpa
        erase_unused(read + prune_unused_inputs(gm))
        return self.options.compile(gm, example_inputs)
