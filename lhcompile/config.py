"""The one configuration object of lhcompile (what to compute, which sites to touch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .geometry import Geometry

Scorer = Literal["norm", "dilated"]
"""The registered scorers' names (``lhcompile.operator.scorers``)."""
InnerAttention = Literal["sdpa", "flash_attn"]
RopeOrder = Literal["before_pooling", "after_selection"]


def _is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclass(frozen=True)
class LighthouseConfig:
    """What the Lighthouse operator computes and where the pass applies it; every field is checked at construction
    (a bad value is refused with the field, the value and the rule).

    The defaults are the paper's main setting: L=3, p=4, k=2048, the norm scorer, tiles of 128, the first two and
    last two attention sites kept dense. A sequence runs Lighthouse from ``min_lighthouse_len`` = p^(L-1) * k
    tokens (32,768 at the defaults); a small model on a CPU needs a small one, e.g.
    ``LighthouseConfig(levels=2, pooling_factor=2, topk=64, tile_budget=16, dense_layers=())`` (from 128 tokens).

    Example::

        config = LighthouseConfig(topk=1536, dense_layers=(0, -1))
        config.min_lighthouse_len   # 24576
        config.gathered_len(131072) # 20484: the length of the dense attention at 128K
    """

    levels: int = 3
    """Pyramid levels L (level 0 is the sequence itself)."""
    pooling_factor: int = 4
    """Pooling factor p between levels; a power of two."""
    topk: int = 2048
    """Top-k budget k per (batch, head); split into k / tile_budget independent tiles."""
    tile_budget: int = 128
    """Entries selected per tile and level (half by ||q||, half by ||k||); the paper uses 128."""
    scorer: Scorer = "norm"
    """How entries are ranked for selection (``lhcompile.operator.scorers``): 'norm', the L2 norm of q and k (the
    paper's default, cheapest); 'dilated', the norm of causal attention within each residue class of positions
    mod ``dilation`` (the paper's §3: better passkey retrieval in its ablation, ~20% fewer stage-1 tokens/s)."""
    dilation: int = 4
    """The dilated scorer's δ (the paper uses 4): a power of two dividing p^(L-1), so that every padded sequence and
    every packed document begins a residue class at its first token. Lengths need not be multiples of it: the
    operator pads a sequence (and each document) to whole tiles, and padding scores 0."""
    dense_layers: tuple[int, ...] = (0, 1, -2, -1)
    """Attention sites (in graph order; negative counts from the end) that stay dense SDPA; with per-layer
    ``fully_shard``, the layers of the layer stack (see ``lhcompile.apply``)."""
    min_seq_len: int = 0
    """Sequences (and packed documents) shorter than this stay dense; the tiles set a floor of p^(L-1) * topk of
    their own, and ``min_lighthouse_len`` reads the larger of the two."""
    inner_attention: InnerAttention = "sdpa"
    """Dense attention on the gathered sub-sequence: PyTorch SDPA, or the flash_attn package."""
    rope: RopeOrder = "before_pooling"
    """Where q and k get the model's rotary position embedding. 'before_pooling' is the paper's order: Lighthouse
    sees what SDPA sees, q and k already rotated, so a pooled entry averages its tokens' rotations.
    'after_selection': the pass finds the rotation upstream of each rewritten SDPA call (Hugging Face's
    rotate_half, GLM's and Cohere's pairs, torchtitan's complex form, ChatGLM's pairs written out, also partial
    rotary), gives Lighthouse the unrotated q and k with the model's tables, and rotates each gathered entry at the
    last position it covers. A site where no rotation is recognised keeps the paper's order, and the report and a
    warning say why."""

    def __new__(cls, *args, **kwargs):
        if "min_lighthouse_len" in kwargs:  # the name README and the reports use for the derived floor
            raise TypeError(
                "LighthouseConfig: min_lighthouse_len is derived, not set: it is the larger of min_seq_len (your "
                "floor, default 0) and the tiles' own p^(L-1) * topk; pass min_seq_len=... to raise it")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        def reject(field: str, rule: str) -> None:
            raise ValueError(f"LighthouseConfig: {field}={getattr(self, field)!r} {rule}")

        for name in ("levels", "pooling_factor", "topk", "tile_budget", "min_seq_len", "dilation"):
            if isinstance(getattr(self, name), bool):  # a bool is an int to Python, never a count here
                reject(name, "must be an int, not a bool")
        if isinstance(self.dense_layers, tuple) and any(isinstance(i, bool) for i in self.dense_layers):
            reject("dense_layers", "must be a tuple of ints (site positions), not bools")

        if not isinstance(self.levels, int) or self.levels < 2:
            reject("levels", "must be an int >= 2 (level 0 plus at least one pooled level)")
        if not isinstance(self.pooling_factor, int) or not _is_power_of_two(self.pooling_factor) or self.pooling_factor < 2:
            reject("pooling_factor", "must be a power of two >= 2")
        if not isinstance(self.tile_budget, int) or self.tile_budget < 2 or self.tile_budget % 2:
            reject("tile_budget", "must be an even int >= 2 (half picked by ||q||, half by ||k||)")
        if not isinstance(self.topk, int) or self.topk <= 0 or self.topk % self.tile_budget:
            reject("topk", f"must be a positive multiple of tile_budget={self.tile_budget}")
        from .operator.scorers import SCORERS  # the registry: the operator's, built after this module

        if self.scorer not in SCORERS:
            reject("scorer", f"is not implemented; the registered scorers are {', '.join(map(repr, SCORERS))}")
        if not isinstance(self.dilation, int) or not _is_power_of_two(self.dilation):
            reject("dilation", "must be a power of two >= 1 (the dilated scorer's residue classes)")
        broken = SCORERS[self.scorer].check(self)
        if broken is not None:
            reject(*broken)
        if not isinstance(self.dense_layers, tuple) or not all(isinstance(i, int) for i in self.dense_layers):
            reject("dense_layers", "must be a tuple of ints (use () to rewrite every site)")
        if not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            reject("min_seq_len", "must be an int >= 0")
        if self.inner_attention not in ("sdpa", "flash_attn"):
            reject("inner_attention", "must be 'sdpa' or 'flash_attn'")
        if self.rope not in ("before_pooling", "after_selection"):
            reject("rope", "must be 'before_pooling' (the paper's order) or 'after_selection'")

    def dense_indices(self, total: int) -> set[int]:
        """The positions among ``total`` sites (or layers) that ``dense_layers`` keeps dense; out-of-range ones are ignored."""
        return {i % total for i in self.dense_layers if -total <= i < total}

    def geometry(self, n: int) -> Geometry:
        """The selection geometry of a sequence of n tokens (n a multiple of ``padded_len(1)``)."""
        return Geometry(n, self.levels, self.pooling_factor, self.topk, self.tile_budget)

    @property
    def min_lighthouse_len(self) -> int:
        """Shortest sequence that runs Lighthouse; shorter ones fall back to dense SDPA.

        Each tile must hold at least tile_budget coarsest entries, so N >= p^(L-1) * k.
        """
        return max(self.min_seq_len, self.geometry(0).min_len)

    def padded_len(self, n: int) -> int:
        """N rounded up so that it splits into T tiles of whole coarsest windows."""
        return self.geometry(n).padded(n)

    def gathered_len(self, n: int) -> int:
        """Length S of the dense sub-sequence for a (padded) length n: N/p^(L-1) + (L-1)*p*k."""
        return self.geometry(self.padded_len(n)).gathered_len
