"""``document_attention`` on a GPU: a batch's documents split into kernel calls (cuDNN's attention for documents
of one padded width together, flash varlen for the rest), and the calls run and reassembled; every device tensor
built from the host's view of the documents travels from pinned memory without waiting for the GPU."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .forms import Segments
from .reference import grouped


@dataclass
class Planner:
    """How ``document_attention`` splits a batch's documents into kernel calls on a GPU, and the cuDNN batch shapes
    it has admitted. One per process (``PLANNER``), as cuDNN's plans are: a plan costs about 0.4-0.8 s to build, and
    a shape admitted stays admitted (so a backward makes its forward's)."""

    cudnn_min_length: int | None = 8192
    """Documents of at least this many tokens run on cuDNN's attention (faster than flash varlen on long documents),
    padded to ``padded_width``, alone or with others of their width; shorter ones run on cuDNN only in batches of
    their width (``cudnn_min_batch``, ``batch_shapes``), all others together in one flash varlen call, which builds
    no plans and takes any mix of lengths. None: flash varlen for every document."""
    cudnn_min_batch: int = 16384
    """Fewest positions (documents x width) of a cuDNN batch of short documents; smaller ones go to the flash
    varlen call, beside which small cuDNN batches were slower than flash varlen on every document (BENCHMARKS.md,
    "Packed documents")."""
    batch_shapes: int = 32
    """Most shapes of cuDNN batches of several documents it builds plans for: a long document alone has one of a
    bounded set of widths, but batches also vary in their count of documents, so past this many shapes a batch of
    short documents runs on flash varlen and one of long documents one document at a time."""
    admitted: set[tuple] = field(default_factory=set)
    """The cuDNN batch shapes (documents, width, and what else a plan depends on) it has admitted."""

    def calls(self, segments: Segments, key: tuple) -> list[_Call]:
        """The kernel calls that compute these documents, each document in one: documents of one ``padded_width``
        run together on cuDNN, in batches of a power of two (which bounds their shapes); long documents (at least
        ``cudnn_min_length`` tokens) always, short ones two or more and ``cudnn_min_batch`` positions at a time
        while the shape is admitted (``key``: the rest of what a cuDNN plan depends on); every other document goes
        to one flash varlen call."""
        firsts, lengths = segments.firsts, segments.lengths
        if self.cudnn_min_length is None:
            return [_Call.flash(firsts, lengths)] if lengths else []
        batches, flash = [], []
        for members, width, long in self._width_groups(lengths):
            if self._batched(members, width) and self._admit((len(members), width, *key)):
                batches.append((members, width))
            elif long:
                batches += [([i], width) for i in members]
            else:
                flash += members
        calls = [_Call.cudnn([firsts[i] for i in part], [lengths[i] for i in part], width) for part, width in batches]
        flash.sort()
        return calls + ([_Call.flash([firsts[i] for i in flash], [lengths[i] for i in flash])] if flash else [])

    def cudnn_share(self, lengths: list[int]) -> float:
        """The share of the attention work of documents of these lengths (n^2 each) that ``document_attention`` runs
        on cuDNN on a GPU: long documents, and short ones in batches of their width while there is room for the
        batch's shape or one like it is admitted (of any heads and dtype: close enough for a choice of kernel)."""
        if self.cudnn_min_length is None or not lengths:
            return 0.0
        on_cudnn = sum(lengths[i] ** 2 for members, width, long in self._width_groups(lengths)
                       if long or self._batched(members, width) and self._room(len(members), width) for i in members)
        return on_cudnn / sum(n * n for n in lengths)

    def _width_groups(self, lengths: list[int]) -> list[tuple[list[int], int, bool]]:
        """The documents (indices into ``lengths``) as cuDNN may batch them: of one ``padded_width``, long (at least
        ``cudnn_min_length`` tokens) or not, in parts of a power of two; each part with its width and whether it is
        long."""
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault((padded_width(n), n >= self.cudnn_min_length), []).append(i)
        parts = []
        for (width, long), members in groups.items():
            for size in _powers_of_two(len(members)):
                parts.append((members[:size], width, long))
                members = members[size:]
        return parts

    def _batched(self, members: list[int], width: int) -> bool:
        return len(members) > 1 and len(members) * width >= self.cudnn_min_batch

    def _admit(self, shape: tuple) -> bool:
        if shape not in self.admitted and len(self.admitted) < self.batch_shapes:
            self.admitted.add(shape)
        return shape in self.admitted

    def _room(self, size: int, width: int) -> bool:
        return len(self.admitted) < self.batch_shapes or any(shape[:2] == (size, width) for shape in self.admitted)


PLANNER = Planner()
"""The process's planner (module-level as cuDNN's plan cache is: see ``Planner``)."""


DENSE_SHARE = 0.9
"""A batch without a long document runs ``document_attention`` in place of the model's own kernel (the pass's
``ON_DOCUMENT_ATTENTION`` graph) where at least this share of its attention work runs on cuDNN
(``Planner.cudnn_share``): with all of it on cuDNN ``document_attention`` beat FlexAttention and flash varlen, with
about two thirds it was slower than either (BENCHMARKS.md, "Packed documents")."""


def _powers_of_two(count: int) -> list[int]:
    """count as a sum of distinct powers of two, the largest first."""
    return [1 << b for b in reversed(range(count.bit_length())) if count >> b & 1]


@dataclass(frozen=True)
class _Call:
    """One kernel call's documents: ``cu`` (D+1,) int32 for flash varlen, or None for a cuDNN batch of (G, W)
    positions, each document right-padded (its last token repeated) to the batch's width W. Its tokens among the
    batch's rows laid end to end are consecutive from ``start`` (read and written as views, no copy) or given by
    ``index``, with ``own`` marking a padded batch's positions that are a document's own."""

    shape: tuple[int, ...]
    """(L,) tokens for flash, (G, W) for cuDNN."""
    start: int | None
    index: Tensor | None
    own: Tensor | None
    cu: Tensor | None
    longest: int

    @classmethod
    def flash(cls, firsts: list[int], lengths: list[int]) -> _Call:
        total = sum(lengths)
        cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
        if _consecutive(firsts, lengths):
            return cls((total,), firsts[0], None, None, cu, max(lengths))
        first, size = torch.tensor(firsts), torch.tensor(lengths)
        index = torch.repeat_interleave(first - cu[:-1], size, output_size=total) + torch.arange(total)
        return cls((total,), None, index, None, cu, max(lengths))

    @classmethod
    def cudnn(cls, firsts: list[int], lengths: list[int], width: int) -> _Call:
        """Right padding never reaches a document's own rows in causal attention."""
        shape = (len(firsts), width)
        if all(n == width for n in lengths) and _consecutive(firsts, lengths):
            return cls(shape, firsts[0], None, None, None, width)
        offset = torch.arange(width)[None]
        first, size = torch.tensor(firsts)[:, None], torch.tensor(lengths)[:, None]
        return cls(shape, None, first + torch.minimum(offset, size - 1), offset < size, None, width)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def take(self, rows: Tensor) -> Tensor:
        """The call's positions of rows (T, ...): (*shape, ...)."""
        if self.index is None:
            return rows[self.start : self.start + self.size].view(*self.shape, *rows.shape[1:])
        return rows[self.index]

    def covers(self, total: int) -> bool:
        return self.start == 0 and self.size == total

    def put(self, buffer: Tensor, values: Tensor) -> None:
        """Write the call's values (*shape, ...) at its documents' own tokens of buffer (T + 1, ...), whose last row
        takes padded positions and is dropped."""
        rows = values.reshape(self.size, *values.shape[len(self.shape):])
        if self.index is None:
            buffer[self.start : self.start + self.size] = rows
        elif self.own is None:
            buffer.index_copy_(0, self.index, rows)
        else:
            buffer.index_put_((torch.where(self.own, self.index, buffer.shape[0] - 1).flatten(),), rows)


def _consecutive(firsts: list[int], lengths: list[int]) -> bool:
    return all(a + n == b for a, n, b in zip(firsts, lengths, firsts[1:]))


def _on_device(calls: list[_Call], device: torch.device) -> list[_Call]:
    """The calls with their index tables on ``device``: one copy from pinned memory per dtype for all of them (which
    does not wait for the GPU), each table a view of it."""
    tables = [t for call in calls for t in (call.index, call.own, call.cu) if t is not None]
    moved: dict[int, Tensor] = {}
    for dtype in {t.dtype for t in tables}:
        same = [t for t in tables if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        flat = (flat.pin_memory() if device.type == "cuda" else flat).to(device, non_blocking=True)
        for t, part in zip(same, flat.split([t.numel() for t in same])):
            moved[id(t)] = part.view(t.shape)
    move = (lambda t: None if t is None else moved[id(t)])
    return [_Call(c.shape, c.start, move(c.index), move(c.own), move(c.cu), c.longest) for c in calls]


def _assemble(parts: list[tuple[_Call, Tensor]], total: int, like: Tensor, fill: float) -> Tensor:
    """Rows (total, ...) of the calls' values at their tokens, ``fill`` at tokens no call computes; a call that
    computes every token gives its values as they are."""
    if len(parts) == 1 and parts[0][0].covers(total):
        call, values = parts[0]
        return values.reshape(total, *values.shape[len(call.shape):])
    buffer = like.new_full((total + 1, *like.shape[1:]), fill)
    for call, values in parts:
        call.put(buffer, values)
    return buffer[:-1]


def padded_width(n: int) -> int:
    """The cuDNN width of a document of n tokens: n rounded up on a grid of 16 widths per octave (at most 1/16
    more), and at least ``MIN_WIDTH``. cuDNN builds an execution plan per new shape (about 0.4-0.8 s for forward and
    backward), so a width per document length would build plans on every batch of real documents;
    the grid bounds them to 16 per octave for a whole training run."""
    step = 1 << max(n.bit_length() - 5, 0)
    return max(-(-n // step) * step, MIN_WIDTH)


MIN_WIDTH = 16
"""Narrowest cuDNN width: cuDNN refuses a sequence of one token."""


def _token_rows(x: Tensor) -> Tensor:
    """(B, H, N, d) -> (B * N, H, d): the layout a model's projections give, in which tokens are gathered."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _gpu_calls(segments: Segments, q: Tensor, v: Tensor) -> list[_Call]:
    return _on_device(PLANNER.calls(segments, (q.shape[1], q.shape[3], v.shape[3], q.dtype)), q.device)


def gpu_forward(q, k, v, segments, scale):
    b, h, n = q.shape[:3]
    rows = [_token_rows(t) for t in (q, grouped(k, h), grouped(v, h))]
    outs, lses = [], []
    for call in _gpu_calls(segments, q, v):
        x = [call.take(r) for r in rows]
        if call.cu is not None:
            o, m, *_ = torch.ops.aten._flash_attention_forward(*x, call.cu, call.cu, call.longest, call.longest, 0.0,
                                                               True, False, scale=scale)
            m = m.t()
        else:
            o, m, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                *(t.transpose(1, 2) for t in x), None, True, 0.0, True, False, scale=scale)
            o, m = o.transpose(1, 2), m.reshape(o.shape[0], h, -1).transpose(1, 2)  # cuDNN's is (G, H, W, 1)
        outs.append((call, o))
        lses.append((call, m))
    out = _assemble(outs, b * n, rows[2], 0.0)
    lse = _assemble(lses, b * n, rows[0].new_empty(0, h, dtype=torch.float32), float("-inf"))
    return out.view(b, n, h, -1).transpose(1, 2), lse.view(b, n, h).transpose(1, 2).contiguous()


def gpu_backward(grad, q, k, v, out, lse, segments, scale):
    b, h, n = q.shape[:3]
    rows = [_token_rows(t) for t in (grad, q, grouped(k, h), grouped(v, h), out)]
    lse_rows = lse.transpose(1, 2).reshape(b * n, h)
    parts: list[list] = [[], [], []]
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    for call in _gpu_calls(segments, q, v):
        g, qx, kx, vx, ox = (call.take(r) for r in rows)
        m = call.take(lse_rows)
        if call.cu is not None:
            grads = torch.ops.aten._flash_attention_backward(
                g, qx, kx, vx, ox, m.t().contiguous(), call.cu, call.cu, call.longest, call.longest, 0.0, True,
                torch.zeros(2, dtype=torch.uint64, device=q.device), torch.empty(0, device=q.device), scale=scale)
        else:
            if call.own is not None:
                g = g * call.own[..., None, None]  # padded rows take no part in the gradients of the document's own
            grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                *(t.transpose(1, 2) for t in (g, qx, kx, vx, ox)), m.transpose(1, 2).unsqueeze(-1).contiguous(),
                zero, zero, None, None, None, call.longest, call.longest, 0.0, True, scale=scale)
            grads = [t.transpose(1, 2) for t in grads]
        for total, part in zip(parts, grads):
            total.append((call, part))
    dq, dk, dv = (_assemble(p, b * n, r, 0.0).view(b, n, h, -1).transpose(1, 2) for p, r in zip(parts, rows[1:4]))
    group = h // k.shape[1]
    if group > 1:
        dk, dv = (t.reshape(b, k.shape[1], group, n, -1).sum(2) for t in (dk, dv))
    return dq, dk, dv

