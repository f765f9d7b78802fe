"""Where each long document of a packed batch lies in one relaid stream: every long document on its own pyramid,
tiles and scatter, with gaps that keep pooled entries and the causal shift inside their document
(``Layout``), and the ops that move a batch's rows into that stream and back (``relay``, ``unrelay``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...config import LighthouseConfig
from .. import stages


@dataclass(frozen=True)
class Layout:
    """Where each long document of a packed (B, N) batch lies in the relaid stream and in the gathered entries.

    Sizes are bounds fixed by (B, N) and the configuration; the tensors say what of them a batch uses."""

    batch: int
    length: int
    relaid_len: int
    """Length of the relaid stream: its last coarsest block is never used (entries past the last document's
    point there)."""
    gathered_len: int
    """Gathered entries of all long documents at most."""
    long: Tensor
    """(B, N) bool: the token belongs to a long document (Lighthouse), else to a short one (dense)."""
    relaid: Tensor
    """(B, N) int64: each long document's token's position in the relaid stream (0 for short documents')."""
    source: Tensor
    """(relaid_len,) int64: the packed token (b * N + t) at each relaid position, or -1 (padding, gaps)."""
    last_token: Tensor
    """(relaid_len,) int64: the packed token whose RoPE row rotates an entry ending at each relaid position (the
    document's last token for its zero padding, as the single-sequence operator clips)."""
    docs: Tensor
    """(3, slots) int32 for ``select_documents``: per document slot, the coarsest entries before it, its coarsest
    entries per tile (0: an unused slot), where its gathered entries start."""
    gathered_starts: Tensor
    """(1, gathered_len) bool: where each document's gathered entries begin."""
    gathered_used: Tensor
    """(1, gathered_len) bool: the entries some document uses."""
    relaid_starts: Tensor
    """(1, relaid_len) bool: where each long document begins in the relaid stream (its padding and gap follow it)."""

    @classmethod
    def of(cls, starts: Tensor, batch: int, length: int, config: LighthouseConfig) -> Layout:
        """The layout of a batch whose documents begin at ``starts`` (B, N) bool (traceable: sizes are static)."""
        g = config.geometry(0)
        span, unit, need = g.coarsest_span, g.unit, config.min_lighthouse_len
        # one slot at least: a dynamic length may be short. torch.sym_max keeps a symbolic length unguarded; on plain
        # ints it is Python's max (Dynamo of torch 2.11 refuses torch.sym_max returning an int)
        per_row = max(length // need, 1) if isinstance(length, int) else torch.sym_max(length // need, 1)
        slots = batch * per_row
        entries = g.top * g.children_per_tile * g.tiles  # a long document's entries beyond n / p^(L-1)
        relaid_len = -(-(batch * length + slots * (unit + span)) // span) * span + span
        gathered_len = (batch * length + slots * (unit - 1)) // span + slots * entries
        device = starts.device
        t = torch.arange(length, device=device)
        rows = torch.arange(batch, device=device).unsqueeze(1)
        starts = starts | (t == 0)
        doc = starts.long().cumsum(1) - 1  # each token's document, counted along its row
        # each document's first token (length for documents a row does not have), and its length
        first = torch.full((batch, length + 1), length, device=device).scatter(
            1, torch.where(starts, doc, length), torch.where(starts, t, length))
        n = first[:, 1:] - first[:, :-1]
        long = n >= need
        slot = torch.where(long, long.long().cumsum(1) - 1 + rows * per_row, slots)  # slot of each long document

        def per_slot(values: Tensor) -> Tensor:
            return torch.zeros(slots + 1, dtype=torch.long, device=device).scatter(
                0, slot.flatten(), values.flatten())[:slots]

        s_len = per_slot(torch.where(long, n, 0))
        s_pad = -(-s_len // unit) * unit
        s_first = per_slot(first[:, :-1] + rows * length)
        region = torch.where(s_len > 0, s_pad + span, 0)
        s_relaid = region.cumsum(0) - region
        s_entries = torch.where(s_len > 0, s_pad // span + entries, 0)
        s_gathered = s_entries.cumsum(0) - s_entries

        token_slot = slot.gather(1, doc)
        token_long = token_slot < slots
        offset = t - first.gather(1, doc)
        relaid = torch.where(token_long, F.pad(s_relaid, (0, 1))[token_slot] + offset, 0)
        flat = t + rows * length
        source = torch.full((relaid_len + 1,), -1, dtype=torch.long, device=device).scatter(
            0, torch.where(token_long, relaid, relaid_len).flatten(), flat.flatten())[:relaid_len]
        r = torch.arange(relaid_len, device=device)
        owner = (torch.searchsorted(s_relaid, r, right=True) - 1).clamp(0, slots - 1)
        last_token = (s_first[owner] + torch.minimum(r - s_relaid[owner], s_len[owner] - 1)).clamp(0, batch * length - 1)
        docs = torch.stack([s_relaid // span, s_pad // unit, s_gathered]).int()
        used = s_entries.sum()
        g_pos = torch.arange(gathered_len, device=device)
        gathered_starts = torch.zeros(gathered_len + 1, dtype=torch.bool, device=device).scatter(
            0, torch.where(s_entries > 0, s_gathered, gathered_len), True)[:gathered_len] | (g_pos == used)
        relaid_starts = torch.zeros(relaid_len + 1, dtype=torch.bool, device=device).scatter(
            0, torch.where(s_len > 0, s_relaid, relaid_len), True)[:relaid_len]
        return cls(batch, length, relaid_len, gathered_len, token_long, relaid, source, last_token, docs,
                   gathered_starts.unsqueeze(0), (g_pos < used).unsqueeze(0), relaid_starts.unsqueeze(0))

    def relay(self, x: Tensor) -> Tensor:
        """The long documents of x (B, H, N, d) relaid: (1, H, relaid_len, d), zeros between them."""
        return _relay(x, self.source, self.relaid, self.long)

    def unrelay(self, o: Tensor) -> Tensor:
        """Relaid rows (1, H, relaid_len, d) back at their packed tokens: (B, H, N, d), zeros at short documents'."""
        return _unrelay(o, self.source, self.relaid, self.long)


# relay and unrelay are each other's adjoint (source and relaid are inverse maps between the long documents' tokens
# and the relaid positions that hold them), so each one's gradient is a gather by the other: no scatter-add, whose
# many rows landing on one index (every gap, every short token) would serialize on a GPU


@torch.library.custom_op("lhcompile::relay", mutates_args=())
def _relay(x: Tensor, source: Tensor, relaid: Tensor, long: Tensor) -> Tensor:
    b, h, n, d = x.shape
    tokens = x.transpose(1, 2).reshape(b * n, h * d)  # a free view of a model's (B, N, H, d) projections
    return stages.take_rows(tokens, source).view(1, -1, h, d).transpose(1, 2)


@_relay.register_fake
def _(x, source, relaid, long):
    return x.new_empty(1, source.shape[0], x.shape[1], x.shape[3]).transpose(1, 2)


@torch.library.custom_op("lhcompile::unrelay", mutates_args=())
def _unrelay(o: Tensor, source: Tensor, relaid: Tensor, long: Tensor) -> Tensor:
    b, n = long.shape
    h, d = o.shape[1], o.shape[3]
    rows = stages.take_rows(o[0].transpose(0, 1).reshape(-1, h * d), torch.where(long, relaid, -1).flatten())
    return rows.view(b, n, h, d).transpose(1, 2)


@_unrelay.register_fake
def _(o, source, relaid, long):
    return o.new_empty(long.shape[0], long.shape[1], o.shape[1], o.shape[3]).transpose(1, 2)


def _relay_backward(ctx, grad):
    return _unrelay(grad, *ctx.saved_tensors), None, None, None


def _unrelay_backward(ctx, grad):
    return _relay(grad, *ctx.saved_tensors), None, None, None


def _save_maps(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[1:])


_relay.register_autograd(_relay_backward, setup_context=_save_maps)
_unrelay.register_autograd(_unrelay_backward, setup_context=_save_maps)

