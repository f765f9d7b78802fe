"""Lighthouse per document: every document of at least ``config.min_lighthouse_len`` tokens gets Lighthouse as if it
were the whole sequence (``Layout`` relays them into one stream), every shorter one dense causal attention within
it (``document_attention``); nothing crosses a boundary."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ...config import LighthouseConfig
from .. import stages
from ..lighthouse import lighthouse_stages
from ..scorers import SCORERS
from ..rotary import Rotary, entry_positions
from .attention import _document_attention
from .forms import Segments
from .layout import Layout


def lighthouse_documents(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, *, batch: int, length: int,
                         scale: float, config: LighthouseConfig, rotary: Rotary | None = None) -> Tensor:
    """Lighthouse per document over a packed (B, H, N, d) batch whose documents begin at ``starts`` (B, N) bool;
    traceable (shapes are plain ints, or symbolic). With ``rotary`` (the model's tables by packed token, positions
    restarting with each document) q and k come unrotated: every gathered entry is rotated at the last token it
    covers, a short document's tokens at their own.

    Run eagerly, the batch's documents pick the work (one host read of the document flags), since the general
    path's stages are sized for the most long documents a batch could hold: a batch with no document of at least
    ``config.min_lighthouse_len`` tokens gets dense attention within each document alone, a batch of one document
    per row plain Lighthouse on each row. Traced (torch.compile, the pass) every batch takes the general path: a
    graph cannot choose without ``torch.cond``, whose backward recomputes its branch's forward (BENCHMARKS.md);
    lhcompile's backend makes the same two choices per call instead, between graphs compiled for each
    (``lhcompile.document_probe``)."""
    if not (isinstance(starts, fx.Proxy) or torch.compiler.is_compiling() or is_fake(starts)):
        found = Segments.of(starts)
        if found.longest < config.min_lighthouse_len:
            return dense_documents(q, k, v, starts, batch=batch, length=length, scale=scale, rotary=rotary)
        if len(found.lengths) == batch:
            return lighthouse_stages(q, k, v, n=length, scale=scale, config=config, rotary=rotary)
    return _every_document(q, k, v, starts, batch=batch, length=length, scale=scale, config=config, rotary=rotary)


def dense_documents(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, *, batch: int, length: int, scale: float,
                    rotary: Rotary | None = None, keep: Tensor | None = None) -> Tensor:
    """Dense causal attention within each document (of those ``keep`` keeps); with ``rotary`` (tables by packed
    token) q and k come unrotated and are rotated at their own tokens first."""
    if rotary is not None:
        q, k = rotary.by_token(batch, length).rotate(
            torch.arange(batch * length, device=q.device).view(batch, 1, length), q, k)
    return _document_attention(q, k, v, starts, keep, scale)[0]


def _every_document(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, *, batch: int, length: int, scale: float,
                    config: LighthouseConfig, rotary: Rotary | None = None) -> Tensor:
    """Every document on its own, whatever the mix: the general path of ``lighthouse_documents``. Any length runs
    (shapes may be symbolic): all documents of a row shorter than ``config.min_lighthouse_len`` are dense."""
    levels, p = config.levels, config.pooling_factor
    layout = Layout.of(starts, batch, length, config)
    qr, kr, vr = (layout.relay(t) for t in (q, k, v))
    own = None
    if rotary is not None:
        def own(qs: Tensor, ks: Tensor) -> tuple[Tensor, Tensor]:  # a relaid row at its packed token
            return rotary.by_token(batch, length).rotate(layout.last_token.view(1, 1, -1), qs, ks)
    s_qk, s_kq = SCORERS[config.scorer].pyramids(qr.detach(), kr.detach(), vr.detach(), config,
                                                 layout.relaid_starts, own)
    index, inv = stages.select_documents(s_qk, s_kq, layout.docs, layout.gathered_len, layout.relaid_len, levels, p,
                                         config.topk, config.tile_budget)
    qg, kg, vg = (stages.gather(t, index, inv, levels, p) for t in (qr, kr, vr))
    if rotary is not None:
        qg, kg = rotary.by_token(batch, length).rotate(
            layout.last_token[entry_positions(index, layout.relaid_len, levels, p)], qg, kg)
    og = _document_attention(qg, kg, vg, layout.gathered_starts, layout.gathered_used, scale)[0]
    long = layout.unrelay(stages.scatter(og, index, inv, layout.relaid_len, levels, p))
    short = dense_documents(q, k, v, starts, batch=batch, length=length, scale=scale, rotary=rotary,
                            keep=~layout.long)
    return long + short  # each is exactly zero at the other's tokens

