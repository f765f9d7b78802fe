"""Public entry points: apply the Lighthouse pass to a model, restore it, inspect it, or use it as a backend.

This module only sequences the work: options are validated once (``rewrite.options``), a module is compiled in
place and its layers found (``capture``), graphs are rewritten by the pass (``rewrite.lighthouse_pass``) as Dynamo
captures them, and what was seen is kept in a ``Report``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.eval_frame import OptimizedModule
from torch.fx.passes.shape_prop import ShapeProp

from .capture import applied as state
from .capture.backend import Backend
from .config import LighthouseConfig
from .passes import restore_sites
from .report import LighthouseWarning, Report
from .rewrite.lighthouse_pass import Scope, rewrite_in_place
from .rewrite.options import Compiler, FilterFn, Options
from .rewrite.placements import SingleDevice


def backend(config: LighthouseConfig | None = None, *, filter_fn: FilterFn | None = None,
            compiler: Compiler = "inductor", debug: bool | None = None) -> Callable[..., Any]:
    """A torch.compile backend that rewrites the attention of every graph it is handed, across graph breaks.

    It never sees the module, so it takes the mode from grad mode at capture (gradients disabled: evaluation, dense)
    and says so with a ``LighthouseWarning``; ``dense_layers`` counts the sites of each graph on its own. ``apply``
    follows the module's train/eval mode and counts the model's sites instead.

    Args:
        config: what Lighthouse computes and where (default ``LighthouseConfig()``).
        filter_fn: called with each attention site's module path; False keeps the site dense.
        compiler: what compiles each rewritten graph: "inductor", "eager", a registered backend name or a callable.
        debug: write each graph's code before and after the rewrite (default: ``LHCOMPILE_DEBUG``).

    Returns:
        The backend; ``lhcompile.inspect(it)`` gives the report of the graphs it compiled.

    Example::

        lighthouse = lhcompile.backend(LighthouseConfig(topk=2048))
        model = torch.compile(model, backend=lighthouse)
        model(ids).sum().backward()
        print(lhcompile.inspect(lighthouse))
    """
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
    """Rewrite the model's causal attention calls into Lighthouse attention for training, in place.

    An ``nn.Module`` is compiled in place with Dynamo, once per mode: in training mode its graphs are rewritten, in
    eval mode they stay dense, and the module's ``training`` flag chooses at every call. Its first call runs its
    forward once more, without gradients and with its attention answered by zeros, to find its layers and where
    each attention call stands (``lhcompile.capture.plan``); ``dense_layers`` counts those calls in execution
    order, whether the layers are compiled on their own or the model whole. A ``GraphModule`` is rewritten now,
    its sites counted in graph order. Parameters, buffers and ``state_dict`` keys stay the model's own; a later
    ``torch.compile(model)`` or ``model.compile()`` keeps Lighthouse. Applying twice with the same settings changes
    nothing; ``restore`` goes back to dense attention.

    Args:
        model: an ``nn.Module`` (also ``torch.compile(model)``, whose module is applied) or a ``GraphModule``.
        config: what Lighthouse computes and where (default ``LighthouseConfig()``); every field is checked here.
        filter_fn: called with each attention site's module path (e.g. ``"model.layers.3.self_attn"``); False
            keeps the site dense.
        compiler: what compiles each rewritten graph: "inductor", "eager" (op by op: the quickest first step on a
            CPU), a registered torch.compile backend name, or a callable ``(gm, example_inputs) -> callable``.
        debug: write each graph's code before and after the rewrite and the site table (default:
            ``LHCOMPILE_DEBUG``).
        example_inputs: for a ``GraphModule`` without shape metadata: inputs to record its shapes with.
        context_parallel: the process group over which each sequence is sharded, rank r holding chunks r and 2W-1-r
            of 2W (PyTorch's head-tail layout; cut inputs with ``lhcompile.context_parallel.shard``): Lighthouse runs
            per chunk with half the budget and joins PyTorch's ring attention; dense sites become ring attention.
        regional: compile each layer of the model on its own (one compile per class of layer, seconds at any
            depth); False compiles the whole model as one graph (minutes at long context, no faster a step).

    Returns:
        The model, applied.

    Example::

        config = LighthouseConfig(levels=2, pooling_factor=2, topk=64, tile_budget=16, dense_layers=())
        lhcompile.apply(model, config, compiler="eager")
        model(ids).sum().backward()           # Lighthouse wherever a sequence is >= config.min_lighthouse_len
        print(lhcompile.inspect(model))       # every attention site: rewritten, or every reason why not
        lhcompile.restore(model)              # dense again: recovery training, export
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
    if state.graph_report(gm) is not None:
        warnings.warn("lhcompile.apply: this GraphModule is already rewritten; nothing new to do", LighthouseWarning,
                      stacklevel=3)
        return gm
    if example_inputs is not None:
        ShapeProp(gm).propagate(*example_inputs)
    report = Report()
    rewrite_in_place(gm, options, report, Scope(training=gm.training))
    state.set_graph_report(gm, report)
    return gm


def _apply_to_module(model: torch.nn.Module, options: Options) -> torch.nn.Module:
    current = state.applied(model)
    if current is not None:
        if current.options != options:
            raise ValueError("lhcompile.apply: the model is already rewritten with other settings; call "
                             "lhcompile.restore(model) first")
        warnings.warn("lhcompile.apply: the model is already rewritten with these settings; nothing new to do",
                      LighthouseWarning, stacklevel=3)
        return model
    _warn_if_never_long_enough(model, options)
    state.Applied.install(model, options)
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
    """Undo ``apply``: the model runs its own dense attention again (for the recovery stage and for export).

    A GraphModule gets back its exact graph, node for node (the inverse pass); a module gets back the compiled calls
    it had before ``apply`` (none, or its own ``Module.compile``), so Dynamo recaptures its dense graphs.
    ``inspect`` then says what the pass did before.

    Args:
        model: a model ``apply`` was given.

    Returns:
        The model, dense.

    Example::

        lhcompile.restore(model)
        torch.onnx.export(model, (ids,), dynamo=True)   # the graph of the model that was never applied
    """
    if isinstance(model, OptimizedModule):
        restore(model._orig_mod)
        return model
    if isinstance(model, fx.GraphModule):
        restored = restore_sites(model)
        state.set_graph_report(model, None)
        if not restored:
            warnings.warn("lhcompile.restore: this GraphModule has no Lighthouse subgraph; nothing to restore",
                          LighthouseWarning, stacklevel=2)
        return model
    current = state.applied(model)
    if current is None:
        warnings.warn(f"lhcompile.restore: {type(model).__name__} was not rewritten by lhcompile; nothing to restore",
                      LighthouseWarning, stacklevel=2)
        return model
    current.uninstall()
    return model


def inspect(model: torch.nn.Module | Callable[..., Any]) -> Report:
    """What lhcompile found and did at every attention site of a model (or of the graphs a backend compiled).

    Args:
        model: a model ``apply`` was given (applied, restored or never applied), or a ``lhcompile.backend()``.

    Returns:
        The ``Report``: one row per attention site and mode (``for site in report``), its table
        (``print(report)``), the sites rewritten (``report.rewritten``) and kept dense (``report.dense``) with every
        reason, and the notes of what was said.

    Example::

        report = lhcompile.inspect(model)
        assert all(s.rewritten for s in report if s.training and s.index not in (0, 1))
    """
    if isinstance(model, Backend):
        return model.report
    if isinstance(model, OptimizedModule):
        return inspect(model._orig_mod)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lhcompile.inspect expects the model lhcompile.apply was given (an nn.Module or "
                        f"GraphModule) or a lhcompile.backend(), got {type(model).__name__}")
    report = state.graph_report(model) if isinstance(model, fx.GraphModule) else state.report_of(model)
    return report if report is not None else Report(state="not applied")
