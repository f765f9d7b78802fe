"""How Lighthouse ranks the entries it selects: a scorer gives, per (batch, head), a score of each base position as a
query (s_qk) and as a key (s_kq), and the pyramid of their maxima over each pooled entry's span.

A scorer is one registered entry (``register_scorer``): its pyramids for a sequence, or for a stream of relaid
packed documents (``starts``: where each document begins, so that nothing it computes crosses a boundary), on every
device (the stages' implementation of the tensors' device does the per-row work: the reference on CPU, the Triton
kernels on CUDA), what it supports, and the rule it sets on the configuration. ``LighthouseConfig.scorer`` names one.
Scores carry no gradient: callers pass detached tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor

from . import stages

LighthouseConfig = Any
"""A ``lhcompile.LighthouseConfig``: not imported here, since the configuration checks its scorer against this
registry."""

Rotate = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]
"""(q, k) -> q and k rotated at their own positions (RoPE after selection hands the scorer unrotated q and k)."""

Pyramids = Callable[[Tensor, Tensor, Tensor, "LighthouseConfig", "Tensor | None", "Rotate | None"],
                    "tuple[Tensor, Tensor]"]
"""(q, k, v (B, H, N, d), config, starts (B, N) bool or None, rotate or None) -> flat fp32 score pyramids s_qk
(B, H, P) and s_kq (B, H or H_kv, P), P = sum_l N / p^l (k and v may have fewer heads than q; an s_kq of H_kv heads
is shared by the query heads of its group). N is a multiple of p^(L-1); zero rows (the operator's padding) score 0."""


@dataclass(frozen=True)
class Scorer:
    """One way to score entries for selection."""

    name: str
    pyramids: Pyramids
    context_parallel: bool
    """Whether it runs on a context-parallel shard's chunks (each chunk scored on its own gives the single-device
    scores only for a scorer that reads one token at a time)."""
    description: str
    check: Callable[["LighthouseConfig"], "tuple[str, str] | None"] = lambda config: None
    """The rule it sets on a configuration: (field, what is wrong) for one it cannot run, else None."""


SCORERS: dict[str, Scorer] = {}
"""The registered scorers, by name (``LighthouseConfig.scorer``). Module-level as a registry is: an entry is added
once, at import, and read wherever a selection runs."""


def register_scorer(scorer: Scorer) -> Scorer:
    """Add a scorer (a third one is an entry here and its tests)."""
    if scorer.name in SCORERS:
        raise ValueError(f"register_scorer: a scorer named {scorer.name!r} is registered already")
    SCORERS[scorer.name] = scorer
    return scorer


# -- norm: the L2 norm of each q and k -------------------------------------------------------------


def _norm(q: Tensor, k: Tensor, v: Tensor, config: LighthouseConfig, starts: Tensor | None,
          rotate: Rotate | None) -> tuple[Tensor, Tensor]:
    # a norm is a token's own: documents change nothing, and a rotation keeps it
    return stages.score(q, k, config.levels, config.pooling_factor)


NORM = register_scorer(Scorer(
    "norm", _norm, context_parallel=True,
    description="the L2 norm of each q and k (the paper's default): cheap, one read of q and k"))


# -- dilated: the norm of causal attention within each residue class of positions mod dilation ---------


def residue_classes(x: Tensor, dilation: int) -> Tensor:
    """(B, H, N, ...) -> (dilation * B, H, N / dilation, ...): row j * B + b holds positions j, j + dilation, ... of
    row b (the paper's view (B, N / δ, δ * H, d), with the residue classes in the batch instead of the heads).
    No size is read, so that the pass can trace it."""
    return x.unflatten(2, (-1, dilation)).movedim(3, 0).flatten(0, 1)


def positions_of_classes(x: Tensor, dilation: int) -> Tensor:
    """The inverse of ``residue_classes``."""
    return x.unflatten(0, (dilation, -1)).movedim(0, 3).flatten(2, 3)


def class_starts(starts: Tensor, dilation: int) -> Tensor:
    """Where documents begin along each residue class: (B, N) bool -> (dilation * B, N / dilation) bool. A class
    position begins a document where its document differs from the class's previous position's."""
    along = residue_classes(starts.long().cumsum(1).unsqueeze(1), dilation).squeeze(1)
    return along != F.pad(along, (1, 0), value=-1)[:, :-1]


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, starts: Tensor | None) -> Tensor:
    """Causal softmax attention (scale 1 / sqrt(d)); with ``starts`` (B, N) within each document only."""
    if starts is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from .documents.attention import _document_attention  # documents build on the scorers' registry

    return _document_attention(q, k, v, starts, None, q.size(-1) ** -0.5)[0]


def _dilated(q: Tensor, k: Tensor, v: Tensor, config: LighthouseConfig, starts: Tensor | None,
             rotate: Rotate | None) -> tuple[Tensor, Tensor]:
    delta = config.dilation
    if rotate is not None:  # attention reads positions: score what the model's SDPA would see
        q, k = rotate(q, k)
    group = q.size(1) // k.size(1)  # a graph value where the pass traces this
    if not (isinstance(group, int) and group == 1):  # keys as queries need a key per query head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    qc, kc, vc = (residue_classes(t, delta) for t in (q, k, v))
    within = None if starts is None else class_starts(starts, delta)
    outs = [positions_of_classes(_causal_attention(a, b, vc, within), delta) for a, b in ((qc, kc), (kc, qc))]
    # a zero row is padding (a sequence's end, a document's last tile): it scores 0, as under the norm scorer
    o_q, o_k = (o * (x != 0).any(-1, keepdim=True) for o, x in zip(outs, (q, k)))
    return stages.score(o_q, o_k, config.levels, config.pooling_factor)


def _dilation_divides(config: LighthouseConfig) -> tuple[str, str] | None:
    span = config.pooling_factor ** (config.levels - 1)
    if span % config.dilation:
        return ("dilation", f"must divide p^(L-1) = {span} (the coarsest span) under scorer='dilated', so that every "
                "document and every padded sequence begins a residue class; use a smaller power of two")
    return None


DILATED = register_scorer(Scorer(
    "dilated", _dilated, context_parallel=False, check=_dilation_divides,
    description="the L2 norm of causal attention within each residue class of positions mod dilation, with q as "
                "queries (s_qk) and with k as queries (s_kq) (the paper's §3): Θ(N²d/δ), on the stock attention"))
