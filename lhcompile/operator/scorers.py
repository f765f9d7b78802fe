"""How Lighthouse ranks the entries it selects: a scorer gives, per (batch, head), a score of each base position as a
query (s_qk) and as a key (s_kq), and the pyramid of their maxima over each pooled entry's span.

A scorer is one registered entry (``register_scorer``): its pyramids for a sequence, or for a stream of relaid
packed documents (``starts``: where each document begins, so that nothing it computes crosses a boundary), on every
device (the reference's on CPU, kernels on CUDA where it has them), and what it supports. ``LighthouseConfig.scorer``
names one. Scores carry no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from . import stages

Pyramids = Callable[[Tensor, Tensor, Tensor, int, int, "Tensor | None"], "tuple[Tensor, Tensor]"]
"""(q, k, v (B, H, N, d), levels, p, starts (B, N) bool or None) -> flat fp32 score pyramids s_qk (B, H, P) and
s_kq (B, H_kv, P), P = sum_l N / p^l (k and v may have fewer heads than q)."""


@dataclass(frozen=True)
class Scorer:
    """One way to score entries for selection."""

    name: str
    pyramids: Pyramids
    context_parallel: bool
    """Whether it runs on a context-parallel shard's chunks (each chunk scored on its own)."""
    description: str


SCORERS: dict[str, Scorer] = {}
"""The registered scorers, by name (``LighthouseConfig.scorer``). Module-level as a registry is: an entry is added
once, at import, and read wherever a selection runs."""


def register_scorer(scorer: Scorer) -> Scorer:
    """Add a scorer (a third one is an entry here and its tests)."""
    if scorer.name in SCORERS:
        raise ValueError(f"register_scorer: a scorer named {scorer.name!r} is registered already")
    SCORERS[scorer.name] = scorer
    return scorer


def _norm(q: Tensor, k: Tensor, v: Tensor, levels: int, p: int, starts: Tensor | None) -> tuple[Tensor, Tensor]:
    return stages.score(q, k, levels, p)  # a norm is a token's own: documents change nothing


NORM = register_scorer(Scorer(
    "norm", _norm, context_parallel=True,
    description="the L2 norm of each q and k (the paper's default): cheap, one read of q and k"))
