"""Public entry points: apply the Lighthouse rewrite to a model, restore it, inspect it, or use it as a backend."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Literal, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from passes import SdpaSite, find_sdpa_sites, restore_sdpa, rewrite_sdpa

from . import ops
from .config import LighthouseConfig
from .debug import Report, SiteReport, debug_enabled, dump_graph

FilterFn = Callable[[str], bool]
"""Called with an SDPA site's module path (e.g. 'model.layers.3.self_attn'); False keeps the site dense."""
Compiler = Literal["inductor", "eager"] | Callable[[fx.GraphModule, Sequence[Any]], Callable]

_STATE = "_lhcompile"  # attribute (nn.Module) or gm.meta key (GraphModule) holding the backend/report


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"F.{target.__name__}"


def _decide(site: SdpaSite, total: int, config: LighthouseConfig, filter_fn: FilterFn | None, training: bool) -> str | None:
    """Why this site stays dense, or None to rewrite it."""
    if site.problem:
        return site.problem
    if not training:
        return "module is in eval mode (Lighthouse is for training; dense SDPA is used)"
    if site.index in {i % total for i in config.dense_layers if -total <= i < total}:
        return f"dense layer (site {site.index} is in dense_layers={config.dense_layers})"
    if filter_fn is not None and not filter_fn(site.module_path):
        return "excluded by filter_fn"
    n = site.q_shape[2]
    if not isinstance(n, int):
        return f"sequence length is dynamic ({n}); Lighthouse needs a static length"
    if n < config.min_lighthouse_len:
        return f"sequence too short: N={n} < min_lighthouse_len={config.min_lighthouse_len}"
    return None


def rewrite_graph(
    gm: fx.GraphModule,
    config: LighthouseConfig,
    report: Report,
    *,
    filter_fn: FilterFn | None = None,
    training: bool = True,
    debug: bool = False,
) -> None:
    """Rewrite the eligible SDPA sites of gm in place and add every site, with its fate, to report."""
    sites = find_sdpa_sites(gm.graph)
    missing = [s for s in sites if s.problem is None and s.q_shape is None]
    if missing:
        raise ValueError(
            f"lhcompile: the graph has no shape metadata for the SDPA call {missing[0].node.name!r} "
            f"(module {missing[0].module_path or '<top>'!r}); pass example_inputs= to lhcompile.apply, or capture "
            "the graph with torch.export / torch.compile, which record shapes"
        )
    graph_id = report.graphs
    report.graphs += 1
    before = gm.code if debug else ""
    chosen = []
    for site in sites:
        reason = _decide(site, len(sites), config, filter_fn, training)
        if reason is None:
            chosen.append(site)
        kv_heads = site.k_shape[1] if site.k_shape and len(site.k_shape) == 4 else None
        report.sites.append(
            SiteReport(graph_id, site.index, site.module_path, _op_name(site.node.target),
                       site.q_shape, kv_heads, reason is None, reason or "lighthouse")
        )

    def build(site: SdpaSite, args: dict[str, Any]) -> fx.Proxy:
        q, k, v = args["query"], args["key"], args["value"]
        return ops.lighthouse_stages(q, k, v, n=site.q_shape[2], scale=args.get("scale"), config=config)

    rewrite_sdpa(gm, chosen, build)
    if debug:
        dump_graph(graph_id, before, gm.code, report)


class LighthouseBackend:
    """A torch.compile backend: rewrite SDPA sites of each captured graph, then hand it to ``compiler``."""

    def __init__(
        self,
        config: LighthouseConfig | None = None,
        *,
        filter_fn: FilterFn | None = None,
        compiler: Compiler = "inductor",
        debug: bool | None = None,
        module: torch.nn.Module | None = None,
    ) -> None:
        self.config = config or LighthouseConfig()
        self.filter_fn = filter_fn
        self.compiler = compiler
        self.debug = debug_enabled(debug)
        self.module = module
        self.report = Report()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        training = self.module.training if self.module is not None else True
        rewrite_graph(gm, self.config, self.report, filter_fn=self.filter_fn, training=training, debug=self.debug)
        if self.compiler == "eager":
            return gm.forward
        if self.compiler == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return self.compiler(gm, example_inputs)


def backend(
    config: LighthouseConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    compiler: Compiler = "inductor",
    debug: bool | None = None,
) -> LighthouseBackend:
    """A backend for ``torch.compile(model, backend=lhcompile.backend(config))``: works across graph breaks."""
    return LighthouseBackend(config, filter_fn=filter_fn, compiler=compiler, debug=debug)


def apply(
    model: torch.nn.Module,
    config: LighthouseConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    compiler: Compiler = "inductor",
    debug: bool | None = None,
    example_inputs: Sequence[Any] | None = None,
) -> torch.nn.Module:
    """Rewrite the model's causal SDPA calls into Lighthouse attention, in place; returns the model.

    - ``torch.fx.GraphModule``: its graph is rewritten now (shapes from node metadata, or from running
      ``example_inputs`` through it).
    - any other ``nn.Module``: compiled in place with Dynamo (``Module.compile``), whose graphs are rewritten
      as they are captured on the first forward call, then compiled by ``compiler`` ("inductor", "eager" to
      run the rewritten graph op by op, or any torch.compile backend). Parameters, buffers and state_dict
      keys stay the module's own. A later ``torch.compile(model)`` is harmless: Dynamo defers to the
      module's own compiled call.
    Applying twice with the same settings changes nothing; use ``restore`` to go back to dense SDPA.
    """
    config = config or LighthouseConfig()
    if isinstance(model, fx.GraphModule):
        if model.meta.get(_STATE) is not None:
            warnings.warn("lhcompile.apply: this GraphModule is already rewritten; nothing new to do", stacklevel=2)
            return model
        if example_inputs is not None:
            ShapeProp(model).propagate(*example_inputs)
        report = Report()
        rewrite_graph(model, config, report, filter_fn=filter_fn, training=model.training, debug=debug_enabled(debug))
        model.meta[_STATE] = report
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lhcompile.apply expects a torch.nn.Module or torch.fx.GraphModule, got {type(model).__name__}")
    current = getattr(model, _STATE, None)
    if current is not None:
        if (current.config, current.filter_fn, current.compiler) != (config, filter_fn, compiler):
            raise ValueError(
                "lhcompile.apply: the model is already rewritten with other settings; call lhcompile.restore(model) first"
            )
        warnings.warn("lhcompile.apply: the model is already rewritten with these settings; nothing new to do", stacklevel=2)
        return model
    if model._compiled_call_impl is not None:
        raise ValueError(
            f"lhcompile.apply: {type(model).__name__} was already compiled in place (Module.compile); "
            "apply lhcompile to the uncompiled module instead (it compiles it itself)"
        )
    lighthouse = LighthouseBackend(config, filter_fn=filter_fn, compiler=compiler, debug=debug, module=model)
    # dynamic=False: a new sequence length gets its own static graph, so the short-sequence rule stays exact
    model.compile(backend=lighthouse, dynamic=False)
    object.__setattr__(model, _STATE, lighthouse)
    return model


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: the model runs its original dense SDPA graph again (for recovery training and export)."""
    if isinstance(model, fx.GraphModule):
        restored = restore_sdpa(model)
        model.meta.pop(_STATE, None)
        if not restored:
            warnings.warn("lhcompile.restore: this GraphModule has no Lighthouse subgraph; nothing to restore", stacklevel=2)
        return model
    if getattr(model, _STATE, None) is None:
        warnings.warn(f"lhcompile.restore: {type(model).__name__} was not rewritten by lhcompile; nothing to restore", stacklevel=2)
        return model
    model._compiled_call_impl = None
    object.__delattr__(model, _STATE)
    return model


def inspect(model: torch.nn.Module) -> Report:
    """What lhcompile found and did at every SDPA site of the model (empty if it was never applied)."""
    if isinstance(model, fx.GraphModule):
        return model.meta.get(_STATE) or Report()
    state = getattr(model, _STATE, None)
    return state.report if state is not None else Report()
