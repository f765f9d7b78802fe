"""The modules of a model's layer stack that are compiled on their own, and the kinds they fall into.

A model's layers are compiled apart from it in three setups: regional compilation (``apply``'s default,
``regional=True``: each item of a layer stack, so that a 30-layer model costs one layer's compile), per-layer
FSDP2 (Dynamo does not trace ``fully_shard``'s hooks, so it compiles each sharded module on its own) and
per-block compilation in place (``block.compile()``, as torchtitan's ``apply_compile`` does). Dynamo reuses one
graph for every module of a class, so ``apply`` compiles these blocks itself, with one backend per kind of block
(same class, dense or not under ``dense_layers``, alike under ``filter_fn``), and ``dense_layers`` counts layers.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from .config import LighthouseConfig
from .report import LighthouseWarning


@dataclass(frozen=True)
class Block:
    """A module that is compiled on its own, and its layer's fate."""

    path: str
    """Module path of the block in the model, e.g. 'model.layers.3'."""
    dense_reason: str | None
    """Why its layer stays dense (the layer is in ``dense_layers``), or None."""
    layer: int
    """Its layer's place in the model's layer stacks: what ``dense_layers`` counts."""


def join_path(prefix: str, path: str) -> str:
    return ".".join(p for p in (prefix, path) if p)


def compiled_alone(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule) or module._compiled_call_impl is not None


def find_blocks(model: torch.nn.Module, config: LighthouseConfig, regional: bool
                ) -> list[tuple[Block, torch.nn.Module]]:
    """Per item of the model's top-most ModuleLists/ModuleDicts (its layer stacks): the top-most modules in it
    that are compiled on their own, or with ``regional`` the item itself where none is and the stack has two
    items or more."""
    layers: list[tuple[str, list[tuple[str, torch.nn.Module]]]] = []
    for path, container in model.named_modules():
        if not isinstance(container, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            continue
        if any(path.startswith(f"{outer}.") for outer, _ in layers):
            continue
        for name, item in container.named_children():
            item_path = join_path(path, name)
            alone: list[tuple[str, torch.nn.Module]] = []
            for inner, module in item.named_modules(prefix=item_path):
                if compiled_alone(module) and not any(inner.startswith(f"{p}.") for p, _ in alone):
                    alone.append((inner, module))
            if not alone and regional and len(container) > 1:
                alone.append((item_path, item))
            if alone:
                layers.append((item_path, alone))
    n = len(layers)
    dense = config.dense_indices(n)
    outside = [i for i in config.dense_layers if not -n <= i < n]
    if n and outside:
        warnings.warn(f"lhcompile.apply: dense_layers entries {outside} are outside the {n} layers of the model's layer "
                      "stack; they keep nothing dense", LighthouseWarning, stacklevel=4)
    return [
        (Block(path, f"dense layer (layer {i} of {n} is in dense_layers={config.dense_layers})" if i in dense else None,
               i), module)
        for i, (_, alone) in enumerate(layers)
        for path, module in alone
    ]


def group_blocks(blocks: list[tuple[Block, torch.nn.Module]], filter_fn: Callable[[str], bool] | None
                 ) -> list[list[tuple[Block, torch.nn.Module]]]:
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
            f"lhcompile.apply: dense_layers and filter_fn split the {cls.__name__} blocks into {count} kinds, each "
            f"its own compiled graph, but Dynamo keeps at most {limit} graphs per code "
            "(torch._dynamo.config.recompile_limit) and training and eval need one each; choose layers by "
            "dense_layers, or make filter_fn answer alike for most layers"
        )
    return list(groups.values())
