"""What the pass decides, before it rewrites: what a captured graph stands for (``Scope``), the graph and the bodies
nested in it (``graphs_of``), what each attention site may do whatever layer the graph serves (``Decision``), and
what a site's place in the model adds (``Pattern``, ``pattern_of``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.fx as fx

from ..passes import DocumentSource, Proofs, RopeMatch, Site, find_sites, subgraph_calls
from .options import Options


@dataclass(frozen=True)
class Scope:
    """What a captured graph stands for."""

    training: bool
    """The mode it was captured for: eval graphs keep every site dense."""
    eval_reason: str = "module is in eval mode (Lighthouse is for training; dense attention is used)"
    mode_from_grad: bool = False
    """``training`` was taken from grad mode at capture (lhcompile.backend never sees the module): a guess."""
    root: torch.nn.Module | None = None
    """The module compiled with it (a layer, or the model); its sites' paths are relative to it."""
    root_path: str = ""
    """The root's path in the model."""
    serves: tuple[str, ...] = ()
    """The paths of every module whose calls its graphs serve (the layers of the root's kind), or () for the root's
    alone."""
    model: torch.nn.Module | None = None
    """The model ``apply`` was called on."""


@dataclass
class CapturedGraph:
    """A graph the pass works on: the captured one, or a body nested in it."""

    module: fx.GraphModule
    label: str
    sites: list[Site]
    at: tuple[int, ...]
    """Where it runs: the positions of the calls that lead to it, from the captured graph down."""
    position: dict[fx.Node, int]
    calls: int = 1

    def order(self, site: Site) -> tuple[int, ...]:
        """A key that sorts sites of all graphs into execution order."""
        return (*self.at, self.position[site.node])


def graphs_of(gm: fx.GraphModule, label: str, resolve: dict[fx.Node, fx.Node] | None = None,
              proofs: Proofs | None = None, at: tuple[int, ...] = ()) -> Iterator[CapturedGraph]:
    """gm, then every body nested in it (depth first, in call order), each body once (at its first call)."""
    resolve = {} if resolve is None else resolve
    proofs = {} if proofs is None else proofs
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    yield CapturedGraph(gm, label, find_sites(gm.graph, resolve.get, proofs), at, position)
    calls = subgraph_calls(gm)
    uses = Counter(call.name for call in calls)
    for call in calls:
        count = uses.pop(call.name, None)
        if count is None:  # a later call of a body already walked
            continue
        if call.inputs:
            resolve.update(call.inputs)
        for nested in graphs_of(call.module, f"{label}.{call.name} ({call.op})", resolve, proofs,
                                (*at, position[call.call])):
            nested.calls *= count
            yield nested


@dataclass(frozen=True)
class Decision:
    """What the pass may do with one site, whatever place in the model the graph's call gives it."""

    graph: CapturedGraph
    site: Site
    reasons: tuple[str, ...]
    """Every reason it stays dense in any layer (empty: it runs Lighthouse unless its place says otherwise)."""
    documents: DocumentSource | None
    """What it attends within: the site's documents, or one document per row at a dynamic length."""
    rotation: tuple[RopeMatch, RopeMatch] | str | None = None
    """With rope='after_selection', where it may run Lighthouse: the rotation found, or why none was."""
    mask: fx.Node | None = None
    """An explicit mask checked at each call (``Site.runtime_mask``): calls where it is not the causal mask keep
    the call as it is (flag 'mask' of the call's pattern)."""

    @property
    def eligible(self) -> bool:
        return not self.reasons


Pattern = tuple[tuple[str, ...], ...]
"""Per site of a graph (in execution order), what its place in the model or its call keeps dense: 'dense_layers'
(its position is in ``config.dense_layers``), 'filter_fn' (``filter_fn`` said no to its path) and 'mask' (the mask
it was handed at this call is not the causal mask)."""


def pattern_of(options: Options, positions: tuple[int, ...], paths: tuple[str, ...], total: int) -> Pattern:
    """The pattern of sites at ``positions`` among ``total`` (negative ``dense_layers`` count from the end)."""
    dense = options.config.dense_indices(total)
    keep = options.filter_fn
    return tuple((("dense_layers",) if p in dense else ()) + (("filter_fn",) if keep is not None and not keep(path)
                                                              else ()) for p, path in zip(positions, paths))


def lighthouse(d: Decision, flags: tuple[str, ...]) -> bool:
    """Whether a site runs Lighthouse at a place that adds ``flags``."""
    return d.eligible and not flags
