"""The shape of a Lighthouse selection (levels, tiles, lengths), derived in one place for every stage.

See docs/algorithm.md. Level l of the pyramid has N / p^l entries; the levels are concatenated along the
sequence axis into one flat pyramid, level l starting at ``offsets[l]``. Selection runs per tile of
``tile_budget`` picks per level; a tile emits its coarsest entries plus ``tile_budget * p`` children per finer
level, and the gathered sub-sequence is the tiles' emitted entries side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


def level_offsets(n: int, levels: int, p: int) -> list[int]:
    """Start of each level in a flat pyramid over n base entries, plus the pyramid's length as the last element."""
    offsets = [0]
    for lvl in range(levels):
        offsets.append(offsets[-1] + n // p**lvl)
    return offsets


@dataclass(frozen=True)
class Geometry:
    """One selection problem: n base entries (a whole number of tiles of whole coarsest windows), L levels,
    pooling factor p, top-k budget k split into tiles of ``tile_budget``."""

    n: int
    levels: int
    p: int
    topk: int
    tile_budget: int

    @property
    def top(self) -> int:
        """The coarsest level, L - 1."""
        return self.levels - 1

    @property
    def coarsest_span(self) -> int:
        """Base tokens covered by one coarsest entry, p^(L-1)."""
        return self.p**self.top

    @property
    def tiles(self) -> int:
        """Independent selection tiles T = k / tile_budget."""
        return self.topk // self.tile_budget

    @property
    def unit(self) -> int:
        """Lengths must be multiples of this: T tiles of whole coarsest windows."""
        return self.coarsest_span * self.tiles

    @property
    def min_len(self) -> int:
        """Shortest n whose tiles hold tile_budget coarsest entries each: p^(L-1) * k."""
        return self.coarsest_span * self.topk

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        return tuple(level_offsets(self.n, self.levels, self.p))

    @property
    def pyramid_len(self) -> int:
        return self.offsets[-1]

    @property
    def coarse_per_tile(self) -> int:
        return self.n // self.coarsest_span // self.tiles

    @property
    def children_per_tile(self) -> int:
        """Candidates of a tile at each finer level: the p children of its tile_budget selected parents."""
        return self.tile_budget * self.p

    @property
    def emitted_per_tile(self) -> int:
        return self.coarse_per_tile + self.top * self.children_per_tile

    @property
    def gathered_len(self) -> int:
        """S = N / p^(L-1) + (L-1) * p * k."""
        return self.tiles * self.emitted_per_tile

    def padded(self, n: int) -> int:
        """n rounded up to a whole number of tiles of whole coarsest windows."""
        return -(-n // self.unit) * self.unit
