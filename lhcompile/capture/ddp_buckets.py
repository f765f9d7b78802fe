"""Where the attention sites of one DDP bucket stand among the whole model's.

Under ``DistributedDataParallel``, Dynamo's DDPOptimizer splits each captured graph into one graph per gradient
bucket and hands the buckets to the backend one at a time, in execution order. ``dense_layers`` counts sites
across the whole model (``-1`` is the model's last), so the pass numbers a bucket's sites from the split graph
that holds all the buckets: it is the module of DDPOptimizer's SubmodCompiler, found on the call stack (Dynamo
passes only the bucket to the backend; its tracing context says that a DDP split is under way).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..passes import count_sites


@dataclass(frozen=True)
class Numbering:
    """The position of a graph's first attention site among the sites of the graph it was split from, and their number."""

    first: int
    total: int


def _split_module() -> fx.GraphModule | None:
    """The split graph DDPOptimizer is compiling, from the call stack: Dynamo hands the backend one bucket only, and
    the split exists nowhere else than as its SubmodCompiler's ``module`` (a private detail of torch, which
    ``tests/test_ddp.py`` holds to)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "SubmodCompiler" and isinstance(getattr(owner, "module", None), fx.GraphModule):
            return owner.module
        frame = frame.f_back
    return None


def in_ddp_split() -> bool:
    """Whether the graph being compiled is one bucket of a graph that DDPOptimizer split."""
    context = torch._guards.TracingContext.try_get()
    return getattr(context, "ddp_optimizer_ctx", None) is not None


def bucket_numbering(gm: fx.GraphModule, known: dict[int, tuple[fx.GraphModule, dict[int, int], int]]
                     ) -> Numbering | None:
    """The numbering of bucket ``gm``'s sites, or None if gm is not a DDP bucket or the split cannot be found.

    ``known`` keeps, per split graph, each bucket's first position and the total: the buckets are counted when
    the first one is compiled, before any bucket is replaced by its compiled form."""
    if not in_ddp_split():
        return None
    split = _split_module()
    if split is None:
        return None
    if id(split) not in known:
        firsts, total = {}, 0
        for node in split.graph.nodes:
            bucket = getattr(split, node.target, None) if node.op == "call_module" else None
            if isinstance(bucket, fx.GraphModule):
                firsts[id(bucket)] = total
                total += count_sites(bucket)
        known[id(split)] = (split, firsts, total)
    _, firsts, total = known[id(split)]
    return Numbering(firsts[id(gm)], total) if id(gm) in firsts else None
