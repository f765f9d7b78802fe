"""RoPE after selection: each gathered entry of q and k rotated at the position of the last token it covers.

With ``LighthouseConfig(rope="after_selection")`` the operator receives q and k before their rotary position
embedding, and the model's own rotation tables (``Rotary``). Scores and pooling work on the unrotated vectors
(rotations keep norms, so the scores are the same), and after the gather an entry of level l with index j is
rotated at position (j+1)·p^l − 1, so a pooled entry carries one position's phase instead of the mean of its
tokens' phases. Along the gathered order these positions never decrease (docs/algorithm.md), so relative
positions inside the dense attention are those of real tokens. Table rows are gathered, never recomputed, so
every RoPE variant (scaled, YaRN, Llama-3, long-RoPE) is rotated as the model does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..geometry import level_offsets
from ..passes.rope import HALF_WIDTH_FORMS, Form


@dataclass(frozen=True)
class Rotary:
    """A model's rotation tables by position: rows (batch, position) of ``cos`` and ``sin``.

    For the two ``rotate_*`` forms the rows are what the model multiplies by (width ``rotary_dim``); for
    ``complex`` they are the real and imaginary parts of ``freqs_cis``, for ``pairs`` the cos and sin of each pair
    (width ``rotary_dim / 2``). ``batch`` is 1 when every sequence of the batch uses the same positions.
    """

    form: Form
    cos: Tensor
    """(batch, length, width)."""
    sin: Tensor
    rotary_dim: int
    """Leading dims of the head dimension that are rotated (less than the head dim under partial rotary)."""
    head_dim: int
    batch: int
    length: int

    @classmethod
    def of(cls, form: Form, cos: Tensor, sin: Tensor, head_dim: int | None = None) -> Rotary:
        """Tables given as tensors: (length, width) or (batch, length, width); ``head_dim`` for partial rotary
        (default: all of it is rotated)."""
        if form not in Form.__args__:
            raise ValueError(f"Rotary: form={form!r}; expected one of {Form.__args__}")
        cos, sin = (t if t.dim() == 3 else t.unsqueeze(0) for t in (cos, sin))
        if cos.shape != sin.shape or cos.dim() != 3:
            raise ValueError(f"Rotary: cos{tuple(cos.shape)} and sin{tuple(sin.shape)} must be equal (length, width) "
                             "or (batch, length, width) tables")
        rotary_dim = 2 * cos.shape[-1] if form in HALF_WIDTH_FORMS else cos.shape[-1]
        return cls(form, cos, sin, rotary_dim, head_dim or rotary_dim, cos.shape[0], cos.shape[1])

    @classmethod
    def from_model_tables(cls, form: Form, rotary_dim: int, head_dim: int, tables: Sequence[Tensor],
                          position_axis: int, shape: Sequence[int]) -> Rotary:
        """The tables as the model multiplies by them, broadcast against the rotated value: ``shape`` is their
        shape padded on the left to the value's rank, batch first, ``position_axis`` their positions, head dim (or its
        complex half) last, 1 elsewhere. Works on traced values (fx.Proxy): a size that is a symbol (a graph of dynamic
        shapes) is read from the traced table, never written in as the capture's symbol."""
        batch, length, width = shape[0], shape[position_axis], shape[-1]
        # every other axis is 1; at most one of batch and length is unknown to Python (-1)
        rows = [t.reshape(batch if isinstance(batch, int) else -1, length if isinstance(length, int) or
                          not isinstance(batch, int) else -1, width) for t in tables]
        batch = batch if isinstance(batch, int) else rows[0].size(0)
        length = length if isinstance(length, int) else rows[0].size(1)
        if form == "complex":
            pairs = torch.view_as_real(rows[0])
            rows = [pairs[..., 0], pairs[..., 1]]
        return cls(form, rows[0], rows[1], rotary_dim, head_dim, batch, length)

    @staticmethod
    def check_for(rope: Rotary | None, order: str, q: Tensor, caller: str) -> None:
        """Reject a call whose tables do not fit ``LighthouseConfig.rope`` or these (B, H, N, d) q (real tensors)."""
        if order == "after_selection" and rope is None:
            raise ValueError(f"{caller}: config.rope='after_selection' rotates q and k after selection, so it needs "
                             "them unrotated and the model's tables: pass rope=lhcompile.Rotary.of(form, cos, sin)")
        if rope is not None:
            rope.check(q)

    def check(self, q: Tensor) -> None:
        """Reject tables that cannot rotate this (B, H, N, d) q, or k (real tensors only)."""
        if self.head_dim != q.shape[-1] or self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"Rotary: rotary_dim={self.rotary_dim} of head_dim={self.head_dim} must be even and at "
                             f"most the head dim, which must be q's ({q.shape[-1]})")
        if self.batch not in (1, q.shape[0]):
            raise ValueError(f"Rotary: tables for a batch of {self.batch}, but q has a batch of {q.shape[0]}")
        if self.length < q.shape[2]:
            raise ValueError(f"Rotary: tables of {self.length} positions for a sequence of {q.shape[2]}")

    @property
    def width(self) -> int:
        """Entries per table row."""
        return self.rotary_dim // 2 if self.form in HALF_WIDTH_FORMS else self.rotary_dim

    def by_token(self, batch: int, length: int) -> Rotary:
        """The tables as rows of a batch's tokens laid end to end (row b * length + t), batch 1: the rows that a
        stream of a packed batch's documents, relaid, reads (``lhcompile.documents``). Works on traced values."""
        cos, sin = (t[:, :length].expand(batch, length, self.width).reshape(1, batch * length, self.width)
                    for t in (self.cos, self.sin))
        return dataclasses.replace(self, cos=cos, sin=sin, batch=1, length=batch * length)

    def rotate(self, positions: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
        """Each of xs (B, H or H_kv, S, d) rotated at ``positions`` (B, H, S, or broadcastable to it): the table rows
        are gathered once for all of them, clipped to the last row (only the zero padding past a sequence's end lies
        beyond it, and what it computes is cut off)."""
        positions = positions.clamp(max=self.length - 1)
        if self.batch == 1:
            rows = self.cos[0][positions], self.sin[0][positions]
        else:
            b = torch.arange(self.batch, device=positions.device).view(self.batch, 1, 1)
            rows = self.cos[b, positions], self.sin[b, positions]
        return tuple(self._rotated(x, *rows) for x in xs)

    def _rotated(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = self.rotary_dim
        # fp32 at least (a traced x, in the pass, is never float64)
        wide = torch.float64 if isinstance(x, Tensor) and x.dtype == torch.float64 else torch.float32
        xr = x[..., :r].to(wide)
        cos, sin = cos.to(wide), sin.to(wide)
        if self.form in HALF_WIDTH_FORMS:
            even, odd = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
        elif self.form == "rotate_half":
            out = xr * cos + torch.cat([-xr[..., r // 2:], xr[..., : r // 2]], dim=-1) * sin
        else:
            out = xr * cos + torch.stack([-xr[..., 1::2], xr[..., 0::2]], dim=-1).flatten(-2) * sin
        out = out.to(x.dtype)
        return out if r == self.head_dim else torch.cat([out, x[..., r:]], dim=-1)


def entry_positions(index: Tensor, n: int, levels: int, p: int) -> Tensor:
    """Position of the last base token each selected pyramid entry covers: (j+1)·p^l − 1 for entry j of level l
    (flat indices ``index`` into the pyramid of n base entries)."""
    offsets = level_offsets(n, levels, p)
    positions = index
    for lvl in range(1, levels):
        positions = torch.where(index >= offsets[lvl], (index - offsets[lvl] + 1) * p**lvl - 1, positions)
    return positions
