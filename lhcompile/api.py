"""Public entry points: apply the Lighthouse rewrite to a model, restore it, inspect it, or use it as a backend."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from passes import SdpaSite, find_sdpa_sites, restore_sdpa, rewrite_sdpa

from . import context_parallel as context_parallel_ops
from . import ops
from .config import LighthouseConfig
from .debug import Report, SiteReport, debug_enabled, dump_graph

FilterFn = Callable[[str], bool]
"""Called with an SDPA site's module path (e.g. 'model.layers.3.self_attn'); False keeps the site dense."""
Compiler = Literal["inductor", "eager"] | Callable[[fx.GraphModule, Sequence[Any]], Callable]

_STATE = "_lhcompile"  # attribute (nn.Module: an _Applied) or gm.meta key (GraphModule: its Report)


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"F.{target.__name__}"


@dataclass(frozen=True)
class Block:
    """A module that Dynamo compiles on its own (a ``fully_shard``-ed layer, or part of one) and its layer's fate."""

    path: str
    """Module path of the block in the model, e.g. 'model.layers.3'."""
    dense_reason: str | None
    """Why its layer stays dense (the layer is in ``dense_layers``), or None."""


def _join(prefix: str, path: str) -> str:
    return ".".join(p for p in (prefix, path) if p)


def _site_path(site: SdpaSite, block: Block | None) -> str:
    """The site's module path in the whole model (a block's graph records it relative to the block)."""
    return _join(block.path if block else "", site.module_path)


def _decide(site: SdpaSite, total: int, config: LighthouseConfig, filter_fn: FilterFn | None, training: bool,
            context_parallel: bool, block: Block | None) -> str | None:
    """Why this site stays dense, or None to rewrite it.

    ``block`` is the module the graph was captured for; None when the graph is the compiled module's own, whose
    sites are counted in graph order for ``dense_layers``.
    """
    if site.problem:
        return site.problem
    if not training:
        return "module is in eval mode (Lighthouse is for training; dense SDPA is used)"
    if block is not None:
        if block.dense_reason:
            return block.dense_reason
    elif site.index in config.dense_indices(total):
        return f"dense layer (site {site.index} is in dense_layers={config.dense_layers})"
    if filter_fn is not None and not filter_fn(_site_path(site, block)):
        return "excluded by filter_fn"
    n = site.q_shape[2]
    if not isinstance(n, int):
        return f"sequence length is dynamic ({n}); Lighthouse needs a static length"
    if context_parallel:
        return context_parallel_ops.chunk_problem(config, n)
    if n < config.min_lighthouse_len:
        return f"sequence too short: N={n} < min_lighthouse_len={config.min_lighthouse_len}"
    return None


def _warn_if_captured_below(root: torch.nn.Module, sites: list[SdpaSite]) -> None:
    for site in sites:
        try:
            root.get_submodule(site.module_path)
        except AttributeError:
            warnings.warn(
                f"lhcompile: the SDPA call of {site.module_path!r} was captured in a graph of one submodule, not of "
                f"{type(root).__name__}: Dynamo compiles that submodule on its own (its hooks are not traced, e.g. "
                "fully_shard on a module that is not inside an item of a ModuleList/ModuleDict of layers) and may "
                "reuse the graph for every submodule of the same class, so dense_layers and filter_fn see one site "
                "per graph and cannot tell them apart. fully_shard the layers of the layer stack (lhcompile then "
                "compiles each kind of layer itself), or only the root",
                stacklevel=2,
            )
            return


def rewrite_graph(
    gm: fx.GraphModule,
    config: LighthouseConfig,
    report: Report,
    *,
    filter_fn: FilterFn | None = None,
    training: bool = True,
    debug: bool = False,
    context_parallel: dist.ProcessGroup | None = None,
    root: torch.nn.Module | None = None,
    blocks: Sequence[Block] = (),
) -> None:
    """Rewrite the eligible SDPA sites of gm in place and add every site, with its fate, to report.

    ``root`` is the module that ``apply`` compiled: a site whose module path does not resolve in it was
    captured in a graph of its own submodule, which is warned about (``dense_layers`` would count wrongly).
    ``blocks``, when given, are the modules this one graph serves (Dynamo reuses a module's graph for every
    module of its class): site paths are relative to them, the first one decides, and each gets its rows.

    With ``context_parallel`` (the group over which the sequence is sharded) every other site is rewritten
    too, into ring attention over the group: a shard's attention must see the whole sequence either way.
    """
    sites = find_sdpa_sites(gm.graph)
    missing = [s for s in sites if s.problem is None and s.q_shape is None]
    if missing:
        raise ValueError(
            f"lhcompile: the graph has no shape metadata for the SDPA call {missing[0].node.name!r} "
            f"(module {missing[0].module_path or '<top>'!r}); pass example_inputs= to lhcompile.apply, or capture "
            "the graph with torch.export / torch.compile, which record shapes"
        )
    if root is not None and not blocks:
        _warn_if_captured_below(root, sites)
    graph_id = report.graphs
    report.graphs += 1
    before = gm.code if debug else ""
    chosen = []
    scopes: Sequence[Block | None] = blocks or [None]  # None: the graph is the compiled module's own
    for site in sites:
        if context_parallel is not None and site.problem:
            raise ValueError(
                f"lhcompile: under context parallelism every SDPA site must become ring attention, but site "
                f"{site.index} (module {site.module_path or '<top>'!r}) cannot: {site.problem}"
            )
        reasons = [_decide(site, len(sites), config, filter_fn, training, context_parallel is not None, block)
                   for block in scopes]
        if reasons[0] is None:
            chosen.append(site)
        kv_heads = site.k_shape[1] if site.k_shape and len(site.k_shape) == 4 else None
        for block, reason in zip(scopes, reasons):
            if reason is not None and context_parallel is not None:
                reason += "; dense ring attention across the context-parallel group"
            report.sites.append(
                SiteReport(graph_id, site.index, _site_path(site, block),
                           _op_name(site.node.target), site.q_shape, kv_heads, reason is None, reason or "lighthouse")
            )
    lighthouse_sites = {id(site) for site in chosen}

    def build(site: SdpaSite, args: dict[str, Any]) -> fx.Proxy:
        q, k, v, scale = args["query"], args["key"], args["value"], args.get("scale")
        if context_parallel is None:
            return ops.lighthouse_stages(q, k, v, n=site.q_shape[2], scale=scale, config=config)
        group_name = context_parallel.group_name
        if id(site) in lighthouse_sites:
            return context_parallel_ops.lighthouse_stages_cp(
                q, k, v, n=site.q_shape[2], group_name=group_name, scale=scale, config=config
            )
        gqa_groups = site.q_shape[1] // site.k_shape[1]
        return context_parallel_ops.dense_stages_cp(q, k, v, gqa_groups=gqa_groups, group_name=group_name, scale=scale)

    rewrite_sdpa(gm, chosen if context_parallel is None else sites, build)
    if debug:
        dump_graph(graph_id, before, gm.code, report)


class LighthouseBackend:
    """A torch.compile backend: rewrite SDPA sites of each captured graph, then hand it to ``compiler``.

    ``module`` is the module compiled with it (its ``training`` flag is read at capture); ``blocks`` the
    modules whose shared graph it captures (see ``rewrite_graph``); ``report`` may be shared between backends.
    """

    def __init__(
        self,
        config: LighthouseConfig | None = None,
        *,
        filter_fn: FilterFn | None = None,
        compiler: Compiler = "inductor",
        debug: bool | None = None,
        module: torch.nn.Module | None = None,
        context_parallel: dist.ProcessGroup | None = None,
        blocks: Sequence[Block] = (),
        report: Report | None = None,
    ) -> None:
        self.config = config or LighthouseConfig()
        if context_parallel is not None:
            context_parallel_ops.chunk_config(self.config)  # fail now, not at the first forward call
        self.filter_fn = filter_fn
        self.compiler = compiler
        self.debug = debug_enabled(debug)
        self.module = module
        self.context_parallel = context_parallel
        self.blocks = tuple(blocks)
        self.report = report if report is not None else Report()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        training = self.module.training if self.module is not None else True
        rewrite_graph(gm, self.config, self.report, filter_fn=self.filter_fn, training=training, debug=self.debug,
                      context_parallel=self.context_parallel, root=self.module, blocks=self.blocks)
        # a causal mask that Lighthouse sites no longer read is N x N; nothing needs it later, since a module's
        # restore recaptures its graph (only a GraphModule rewritten in place keeps it, for restore_sdpa)
        if gm.graph.eliminate_dead_code():
            gm.recompile()
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
    context_parallel: dist.ProcessGroup | None = None,
) -> torch.nn.Module:
    """Rewrite the model's causal SDPA calls into Lighthouse attention, in place; returns the model.

    - ``torch.fx.GraphModule``: its graph is rewritten now (shapes from node metadata, or from running
      ``example_inputs`` through it).
    - any other ``nn.Module``: compiled in place with Dynamo (``Module.compile``), whose graphs are rewritten
      as they are captured on the first forward call, then compiled by ``compiler`` ("inductor", "eager" to
      run the rewritten graph op by op, or any torch.compile backend). Parameters, buffers and state_dict
      keys stay the module's own. A later ``torch.compile(model)`` is harmless: Dynamo defers to the
      module's own compiled call.
    - ``context_parallel``: the process group over which each sequence is sharded, rank r holding chunks r
      and 2W-1-r of 2W (PyTorch's head-tail layout; cut inputs with ``lhcompile.context_parallel.shard``).
      Lighthouse then runs per chunk with half the budget and its gathered tokens join PyTorch's ring
      attention; every site kept dense becomes ring attention too (see ``lhcompile.context_parallel``).
    - per-layer FSDP2 (``fully_shard`` on the layers of a ModuleList/ModuleDict, or on modules inside them):
      those modules are compiled one by one, sharing one backend per kind of layer, and ``dense_layers``
      counts layers (see ``_sharded_blocks``).
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
        if context_parallel is not None:
            context_parallel_ops.chunk_config(config)
        rewrite_graph(model, config, report, filter_fn=filter_fn, training=model.training, debug=debug_enabled(debug),
                      context_parallel=context_parallel)
        model.meta[_STATE] = report
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lhcompile.apply expects a torch.nn.Module or torch.fx.GraphModule, got {type(model).__name__}")
    settings = (config, filter_fn, compiler, debug, context_parallel)
    current = getattr(model, _STATE, None)
    if current is not None:
        if current.settings != settings:
            raise ValueError(
                "lhcompile.apply: the model is already rewritten with other settings; call lhcompile.restore(model) first"
            )
        warnings.warn("lhcompile.apply: the model is already rewritten with these settings; nothing new to do", stacklevel=2)
        return model
    blocks = _sharded_blocks(model, config)
    for path, module in [("", model), *((b.path, m) for b, m in blocks)]:
        if module._compiled_call_impl is not None:
            raise ValueError(
                f"lhcompile.apply: {type(module).__name__} {path or '(the model)'} was already compiled in place "
                "(Module.compile); apply lhcompile to the uncompiled model instead (it compiles it itself)"
            )
    report = Report()
    options = dict(filter_fn=filter_fn, compiler=compiler, debug=debug, context_parallel=context_parallel, report=report)
    for members in _group_blocks(blocks, filter_fn):
        block_backend = LighthouseBackend(config, module=members[0][1], blocks=[b for b, _ in members], **options)
        for _, module in members:
            module.compile(backend=block_backend, dynamic=False)
    # dynamic=False: a new sequence length gets its own static graph, so the short-sequence rule stays exact
    model.compile(backend=LighthouseBackend(config, module=model, **options), dynamic=False)
    object.__setattr__(model, _STATE, _Applied(settings, report, [model, *(m for _, m in blocks)]))
    return model


@dataclass
class _Applied:
    """What ``apply`` did to a module: with which settings, what it found, and which modules it compiled in place."""

    settings: tuple
    report: Report
    compiled: list[torch.nn.Module]


def _sharded_blocks(model: torch.nn.Module, config: LighthouseConfig) -> list[tuple[Block, torch.nn.Module]]:
    """The ``fully_shard``-ed modules inside the model's layers (items of a ModuleList/ModuleDict), top-most only.

    Dynamo does not trace FSDP2's hooks, so it compiles each such module on its own, as one graph that it
    reuses for every module of the class; ``apply`` compiles them itself, one backend per kind of block.
    ``dense_layers`` counts the layers that hold such modules.
    """
    from torch.distributed.fsdp import FSDPModule

    layers: list[tuple[str, list[tuple[str, torch.nn.Module]]]] = []
    for path, container in model.named_modules():
        if not isinstance(container, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            continue
        if any(path.startswith(f"{outer}.") for outer, _ in layers):
            continue
        for name, item in container.named_children():
            item_path = _join(path, name)
            sharded: list[tuple[str, torch.nn.Module]] = []
            for inner, module in item.named_modules(prefix=item_path):
                if isinstance(module, FSDPModule) and not any(inner.startswith(f"{p}.") for p, _ in sharded):
                    sharded.append((inner, module))
            if sharded:
                layers.append((item_path, sharded))
    n = len(layers)
    dense = config.dense_indices(n)
    return [
        (Block(path, f"dense layer (layer {i} of {n} is in dense_layers={config.dense_layers})" if i in dense else None),
         module)
        for i, (_, sharded) in enumerate(layers)
        for path, module in sharded
    ]


def _group_blocks(blocks: list[tuple[Block, torch.nn.Module]],
                  filter_fn: FilterFn | None) -> list[list[tuple[Block, torch.nn.Module]]]:
    """Split the blocks into kinds that can share one compiled graph: same class, dense or not alike, and the
    same filter_fn verdict on every module path inside them (so on the path of every SDPA call)."""
    groups: dict[tuple, list[tuple[Block, torch.nn.Module]]] = {}
    for block, module in blocks:
        verdicts = tuple(filter_fn(path) for path, _ in module.named_modules(prefix=block.path)) if filter_fn else ()
        groups.setdefault((type(module), block.dense_reason is None, verdicts), []).append((block, module))
    limit = torch._dynamo.config.recompile_limit
    cls, count = Counter(cls for cls, _, _ in groups).most_common(1)[0] if groups else (None, 0)
    if count > limit // 2:
        raise ValueError(
            f"lhcompile.apply: dense_layers and filter_fn split the sharded {cls.__name__} modules into {count} "
            f"kinds, each its own compiled graph, but Dynamo keeps at most {limit} graphs per code "
            "(torch._dynamo.config.recompile_limit) and training and eval need one each; choose layers by "
            "dense_layers, or make filter_fn answer alike for most layers"
        )
    return list(groups.values())


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: the model runs its original dense SDPA graph again (for recovery training and export)."""
    if isinstance(model, fx.GraphModule):
        restored = restore_sdpa(model)
        model.meta.pop(_STATE, None)
        if not restored:
            warnings.warn("lhcompile.restore: this GraphModule has no Lighthouse subgraph; nothing to restore", stacklevel=2)
        return model
    state = getattr(model, _STATE, None)
    if state is None:
        warnings.warn(f"lhcompile.restore: {type(model).__name__} was not rewritten by lhcompile; nothing to restore", stacklevel=2)
        return model
    for module in state.compiled:
        module._compiled_call_impl = None
    object.__delattr__(model, _STATE)
    return model


def inspect(model: torch.nn.Module) -> Report:
    """What lhcompile found and did at every SDPA site of the model (empty if it was never applied)."""
    if isinstance(model, fx.GraphModule):
        return model.meta.get(_STATE) or Report()
    state = getattr(model, _STATE, None)
    return state.report if state is not None else Report()
