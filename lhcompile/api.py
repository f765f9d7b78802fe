"""Public entry points: apply the Lighthouse pass to a model, restore it, inspect it, or use it as a backend.

This module only sequences the work: options are validated once (``options``), graphs are rewritten by the
pass (``lighthouse_pass``) as Dynamo captures them (``backend``), layers compiled on their own are found by
``blocks``, modules are compiled in place by ``compiled_module``, and what was seen is kept in a ``Report``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.eval_frame import OptimizedModule
from torch.fx.passes.shape_prop import ShapeProp

from .capture.backend import Backend
from .capture.applied import STATE, Applied, applied

RESTORED = "_lhcompile_restored"
"""Where a restored model keeps the report of what the pass did before (``inspect`` returns it)."""
from .config import LighthouseConfig
from .rewrite.lighthouse_pass import Scope, rewrite_in_place
from .rewrite.options import Compiler, FilterFn, Options
from .passes import restore_sites
from .report import LighthouseWarning, Report
from .rewrite.placements import SingleDevice



def backend(config: LighthouseConfig | None = None, *, filter_fn: FilterFn | None = None,
            compiler: Compiler = "inductor", debug: bool | None = None) -> Callable[..., Any]:
    """A backend for ``torch.compile(model, backend=lhcompile.backend(config))``: works across graph breaks.

    It never sees the module, so it takes the mode from grad mode at capture (gradients disabled: evaluation,
    dense), and says so with a LighthouseWarning; ``apply`` follows the module's train/eval mode instead."""
    return Backend(Options.make(config, filter_fn=filter_fn, compiler=compiler, debug=debug,
                                          caller="lhcompile.backend"))


def apply(
    model: torch.nn.Module,
    config: LighthouseConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    compiler: Compiler = "inductor",
    debug: bool | None = None,
    example_inputs: Sequence[Any] | None = None,
    context_parallel: dist.ProcessGroup | None = None,
    regional: bool = True,
) -> torch.nn.Module:
    """Rewrite the model's causal SDPA calls into Lighthouse attention, in place; returns the model.

    - ``torch.fx.GraphModule``: its graph is rewritten now (shapes from node metadata, or from running
      ``example_inputs`` through it).
    - any other ``nn.Module``: compiled in place with Dynamo, once per mode: in training mode its graphs are
      rewritten as they are captured on the first forward call, in eval mode they stay dense; the module's
      ``training`` flag picks the graph at every call. With ``regional`` (the default) and a layer stack (a
      ModuleList/ModuleDict of two layers or more), each layer is compiled on its own and Dynamo reuses one graph
      per kind of layer (class, dense or not), so the compile costs about two layers' whatever the depth; the
      rest of the model (embeddings, head, loss) runs as written, and attention outside the layer stack stays
      dense. ``regional=False`` compiles the whole model as one graph: minutes of compiling at long context, for
      a steady step no faster (BENCHMARKS.md). Each graph then goes to ``compiler`` ("inductor", "eager" to run
      the rewritten graph op by op, any registered torch.compile backend name, or a backend callable).
      Parameters, buffers and state_dict keys stay the module's own. A later ``torch.compile(model)`` is
      harmless: Dynamo defers to the module's own compiled call. ``torch.compile(model)`` (an OptimizedModule)
      is applied to the module it wraps.
    - ``context_parallel``: the process group over which each sequence is sharded, rank r holding chunks r
      and 2W-1-r of 2W (PyTorch's head-tail layout; cut inputs with ``lhcompile.context_parallel.shard``).
      Lighthouse then runs per chunk with half the budget and its gathered tokens join PyTorch's ring
      attention; every site kept dense becomes ring attention too (see ``lhcompile.context_parallel``).
    - layers compiled on their own (regional, per-layer ``fully_shard``, or ``block.compile()`` in place, inside
      the items of a ModuleList/ModuleDict): ``apply`` compiles them itself, one backend per kind of layer, and
      ``dense_layers`` counts layers (see ``lhcompile.blocks``); ``restore`` gives back their own compiled calls.
    Applying twice with the same settings changes nothing; use ``restore`` to go back to dense SDPA.
    """
    options = Options.make(config, filter_fn=filter_fn, compiler=compiler, debug=debug,
                           context_parallel=context_parallel, regional=regional)
    if isinstance(model, OptimizedModule):
        apply(model._orig_mod, config, filter_fn=filter_fn, compiler=compiler, debug=debug,
              example_inputs=example_inputs, context_parallel=context_parallel, regional=regional)
        return model
    if isinstance(model, fx.GraphModule):
        return _apply_to_graph(model, options, example_inputs)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lhcompile.apply expects a torch.nn.Module or torch.fx.GraphModule, got {type(model).__name__}")
    return _apply_to_module(model, options)


def _apply_to_graph(gm: fx.GraphModule, options: Options, example_inputs: Sequence[Any] | None) -> fx.GraphModule:
    if gm.meta.get(STATE) is not None:
        warnings.warn("lhcompile.apply: this GraphModule is already rewritten; nothing new to do", LighthouseWarning,
                      stacklevel=3)
        return gm
    if example_inputs is not None:
        ShapeProp(gm).propagate(*example_inputs)
    report = Report()
    rewrite_in_place(gm, options, report, Scope(training=gm.training))
    gm.meta.pop(RESTORED, None)
    gm.meta[STATE] = report
    return gm


def _apply_to_module(model: torch.nn.Module, options: Options) -> torch.nn.Module:
    current = applied(model)
    if current is not None:
        if current.options != options:
            raise ValueError("lhcompile.apply: the model is already rewritten with other settings; call "
                             "lhcompile.restore(model) first")
        warnings.warn("lhcompile.apply: the model is already rewritten with these settings; nothing new to do",
                      LighthouseWarning, stacklevel=3)
        return model
    _warn_if_never_long_enough(model, options)
    model.__dict__.pop(RESTORED, None)
    Applied.install(model, options)
    return model


def _warn_if_never_long_enough(model: torch.nn.Module, options: Options) -> None:
    need = options.config.min_lighthouse_len
    longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(options.placement, SingleDevice) and isinstance(longest, int) and need > longest:
        warnings.warn(
            f"lhcompile.apply: Lighthouse needs sequences of at least {need} tokens (min_lighthouse_len of "
            f"{options.config}), but the model's config allows at most max_position_embeddings={longest}: no site "
            "will ever be rewritten; lower topk (the floor is pooling_factor^(levels-1) * topk) or min_seq_len",
            LighthouseWarning, stacklevel=4)


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: the model runs its original dense SDPA graph again (for recovery training and export).

    A GraphModule gets back its exact graph (the inverse pass); a module gets back the compiled calls it had
    before ``apply`` (none, or its own ``Module.compile``), so Dynamo recaptures its dense graphs.
    """
    if isinstance(model, OptimizedModule):
        restore(model._orig_mod)
        return model
    if isinstance(model, fx.GraphModule):
        restored = restore_sites(model)
        report = model.meta.pop(STATE, None)
        if report is not None:
            report.state = "restored"
            model.meta[RESTORED] = report
        if not restored:
            warnings.warn("lhcompile.restore: this GraphModule has no Lighthouse subgraph; nothing to restore",
                          LighthouseWarning, stacklevel=2)
        return model
    state = applied(model)
    if state is None:
        warnings.warn(f"lhcompile.restore: {type(model).__name__} was not rewritten by lhcompile; nothing to restore",
                      LighthouseWarning, stacklevel=2)
        return model
    state.uninstall()
    state.report.state = "restored"
    object.__setattr__(model, RESTORED, state.report)
    return model


def inspect(model: torch.nn.Module | Callable[..., Any]) -> Report:
    """What lhcompile found and did at every attention site of the model (empty if it was never applied), or of
    the graphs a ``lhcompile.backend()`` has compiled."""
    if isinstance(model, Backend):
        return model.report
    if isinstance(model, OptimizedModule):
        return inspect(model._orig_mod)
    if isinstance(model, fx.GraphModule):
        report = model.meta.get(STATE, model.meta.get(RESTORED))
    elif not isinstance(model, torch.nn.Module):
        raise TypeError(f"lhcompile.inspect expects the model lhcompile.apply was given (an nn.Module or "
                        f"GraphModule) or a lhcompile.backend(), got {type(model).__name__}")
    else:
        state = applied(model)
        report = state.report if state is not None else model.__dict__.get(RESTORED)
    return report if report is not None else Report(state="not applied")
