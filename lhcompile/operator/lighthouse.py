"""The Lighthouse operator on one sequence, composed of the stages (``stages``): score (by the configured scorer),
select, gather, stock causal attention on the gathered sub-sequence, scatter; per chunk of a sequence where
context parallelism shards it."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import LighthouseConfig
from .rotary import Rotary, entry_positions
from .scorers import SCORERS
from .stages import gather, scatter, select


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None, kernel: str) -> Tensor:
    """Stock causal attention on the gathered sub-sequence (all tensors (B, H, S, d))."""
    if kernel == "flash_attn":
        try:
            from flash_attn import flash_attn_func
        except ImportError as err:
            raise RuntimeError(
                "LighthouseConfig(inner_attention='flash_attn') but the flash_attn package is not importable; "
                "install flash-attn or use inner_attention='sdpa'"
            ) from err
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _part(t: Tensor, i: int, length: int, parts: int) -> Tensor:
    """Part i of ``parts`` equal parts of t along the sequence (t itself when there is one part)."""
    return t if parts == 1 else t[:, :, i * length : (i + 1) * length]


def _joined(parts: Sequence[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def chunked_stages(q: Tensor, k: Tensor, v: Tensor, *, chunks: int, chunk_len: int, config: LighthouseConfig,
                   attention: Callable[[Tensor, Tensor, Tensor], Tensor], rotary: Rotary | None = None) -> Tensor:
    """Per chunk of chunk_len tokens: score (``config.scorer``), select, gather; then ``attention`` over the chunks' gathered
    sub-sequences joined in chunk order; then per chunk: scatter. One chunk is the single-device operator;
    several are context parallelism's (``lhcompile.context_parallel``). With ``rotary`` (tables whose rows are
    the positions of q's tokens, all chunks in order) q and k come unrotated and each gathered entry is rotated
    at the last position it covers, chunk i's rows starting at i * chunk_len. Shapes come in as plain ints so
    that the graph pass can trace this function into a graph."""
    levels, p = config.levels, config.pooling_factor
    gathered, selections = [], []
    for i in range(chunks):
        qc, kc, vc = (_part(t, i, chunk_len, chunks) for t in (q, k, v))
        own = None if rotary is None else _rotate_at(rotary, i * chunk_len, chunk_len)
        s_qk, s_kq = SCORERS[config.scorer].pyramids(qc.detach(), kc.detach(), vc.detach(), config, None, own)
        index, inv = select(s_qk, s_kq, chunk_len, levels, p, config.topk, config.tile_budget)
        qg, kg, vg = (gather(t, index, inv, levels, p) for t in (qc, kc, vc))
        if rotary is not None:
            positions = entry_positions(index, chunk_len, levels, p) + i * chunk_len
            qg, kg = rotary.rotate(positions, qg, kg)
        gathered.append([qg, kg, vg])
        selections.append((index, inv))
    o = attention(*(_joined(parts) for parts in zip(*gathered)))
    s = config.gathered_len(chunk_len)
    return _joined([scatter(_part(o, i, s, chunks), index, inv, chunk_len, levels, p)
                    for i, (index, inv) in enumerate(selections)])


def _rotate_at(rotary: Rotary, first: int, length: int):
    """q and k of ``length`` rows from position ``first`` rotated at their own positions (for a scorer)."""

    def rotate(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return rotary.rotate(torch.arange(first, first + length, device=q.device).view(1, 1, length), q, k)

    return rotate


def lighthouse_stages(q: Tensor, k: Tensor, v: Tensor, *, n: int, scale: float | None, config: LighthouseConfig,
                      rotary: Rotary | None = None) -> Tensor:
    """The staged subgraph for a sequence of known length n (>= config.min_lighthouse_len); with ``rotary``, q and
    k are unrotated (RoPE after selection).

    A length that does not split into whole tiles is zero-padded at the end; padded positions only
    ever reach outputs beyond n, which are cut off.
    """
    padded = config.padded_len(n)
    if padded != n:
        q, k, v = (F.pad(t, (0, 0, 0, padded - n)) for t in (q, k, v))
    out = chunked_stages(q, k, v, chunks=1, chunk_len=padded, config=config, rotary=rotary,
                         attention=lambda qg, kg, vg: dense_attention(qg, kg, vg, scale, config.inner_attention))
    if padded != n:
        out = out[:, :, :n]
    return out
