"""Pure-PyTorch reference of every Lighthouse stage: the oracle that fast paths are tested against.

Layout conventions shared by all stages (docs/algorithm.md has the algorithm):
- tensors are SDPA's (B, H, N, d); k and v may have H_kv heads with H % H_kv == 0 (GQA);
- a *pyramid* concatenates the levels along the sequence axis: level l (N / p^l entries) starts at
  ``level_offsets(n, L, p)[l]``; an entry is addressed by its *flat* index into that concatenation;
- a *selection* is a (B, H, S) int64 tensor of flat indices, sorted by the position key that makes
  plain causal attention over the gathered sub-sequence respect causality, and its inverse ``inv``
  (B, H, P) int32: the slot of each pyramid entry in the selection, or -1.

The stage functions (``score``, ``select``, ``gather``, ``gather_backward``, ``scatter``,
``scatter_backward``) have the signatures of ``lhcompile.kernels``' so that ``lhcompile.ops`` runs either;
they are composed of the oracle's building blocks below them (``cascade``, ``pool``, ``take``, ...), which are
differentiable by autograd where the operator carries gradients; the explicit ``*_backward`` formulas are
what the kernels implement, checked against that autograd.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..geometry import Geometry, level_offsets


def _acc(t: torch.Tensor) -> torch.Tensor:
    """t in the accumulation precision: fp32 for half types, unchanged for fp32/fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def pool(x: torch.Tensor, levels: int, p: int) -> torch.Tensor:
    """Mean-pool x (B, H, N, d) into levels 1..L-1, concatenated: (B, H, sum_l N/p^l, d), x.dtype.

    Level 0 is x itself and is not copied; means are taken in fp32 over the base tokens of each span.
    """
    b, h, n, d = x.shape
    xf = _acc(x)
    coarse = [xf.view(b, h, n // p**lvl, p**lvl, d).mean(dim=3) for lvl in range(1, levels)]
    return torch.cat(coarse, dim=2).to(x.dtype)


def pool_backward(grad_pooled: torch.Tensor, n: int, levels: int, p: int) -> torch.Tensor:
    """Gradient of ``pool`` w.r.t. x: each pooled entry spreads grad / p^l over its span."""
    grad = None
    start = 0
    for lvl in range(1, levels):
        span = p**lvl
        g = _acc(grad_pooled[:, :, start : start + n // span]) / span
        g = g.repeat_interleave(span, dim=2)
        grad = g if grad is None else grad + g
        start += n // span
    return grad.to(grad_pooled.dtype)


def score(q: torch.Tensor, k: torch.Tensor, levels: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat score pyramids (fp32): level 0 holds ||q_i|| and ||k_i||; a coarser entry the MAX over its span.

    Returns s_qk (B, H, P) and s_kq (B, H_kv, P), P = sum_l N / p^l.
    """

    def pyramid(x: torch.Tensor) -> torch.Tensor:
        s0 = torch.linalg.vector_norm(x.float(), dim=-1)
        b, h, n = s0.shape
        out = [s0] + [s0.view(b, h, n // p**lvl, p**lvl).amax(dim=-1) for lvl in range(1, levels)]
        return torch.cat(out, dim=-1)

    return pyramid(q), pyramid(k)


def _pick(s_qk: torch.Tensor, s_kq: torch.Tensor, half: int) -> torch.Tensor:
    """Positions (along the last axis) of the half top-||q|| candidates, then half top-||k|| among the rest.

    Ties go to the earlier candidate (stable sort); candidates are kept in ascending position order.
    """
    by_qk = torch.sort(s_qk, dim=-1, descending=True, stable=True).indices[..., :half]
    rest = s_kq.scatter(-1, by_qk, float("-inf"))
    by_kq = torch.sort(rest, dim=-1, descending=True, stable=True).indices[..., :half]
    return torch.cat([by_qk, by_kq], dim=-1)


def cascade(
    s_qk: torch.Tensor, s_kq: torch.Tensor, n: int, levels: int, p: int, topk: int, tile_budget: int
) -> torch.Tensor:
    """Stratified coarse-to-fine top-k cascade; returns the emitted entries' flat indices sorted by position key.

    s_qk is (B, H, P); s_kq is (B, H_kv, P) and is shared by the H / H_kv query heads of its group.
    Output: (B, H, S) int64, S = N / p^(L-1) + (L-1) * p * topk.
    """
    b, h, _ = s_qk.shape
    s_kq = s_kq.repeat_interleave(h // s_kq.shape[1], dim=1)
    g = Geometry(n, levels, p, topk, tile_budget)
    offsets, tiles, top = g.offsets, g.tiles, g.top
    scale = 2**top  # position keys are integers in units of 2^-(L-1) tokens
    device = s_qk.device

    # candidates: (B, H, T, C) level-local indices, ascending within each tile
    cand = torch.arange(n // p**top, device=device).view(1, 1, tiles, -1).expand(b, h, -1, -1)
    flat_parts, key_parts = [], []
    for lvl in range(top, -1, -1):
        span = p**lvl
        level_qk = s_qk[..., offsets[lvl] : offsets[lvl + 1]]
        level_kq = s_kq[..., offsets[lvl] : offsets[lvl + 1]]
        start = cand * span
        key = start * scale
        if lvl > 0:
            pick = _pick(
                level_qk.gather(-1, cand.flatten(2)).view_as(cand),
                level_kq.gather(-1, cand.flatten(2)).view_as(cand),
                tile_budget // 2,
            )
            descended = torch.zeros_like(cand, dtype=torch.bool).scatter(-1, pick, True)
            # a parent that descends sits just after its span, after all its descendants
            key = torch.where(descended, (start + span) * scale - 2 ** (top - lvl), key)
            parents = cand.gather(-1, pick).sort(dim=-1).values
            next_cand = (parents.unsqueeze(-1) * p + torch.arange(p, device=device)).flatten(-2)
        flat_parts.append((cand + offsets[lvl]).flatten(2))
        key_parts.append(key.flatten(2))
        if lvl > 0:
            cand = next_cand
    flat = torch.cat(flat_parts, dim=-1)
    order = torch.cat(key_parts, dim=-1).argsort(dim=-1)
    return flat.gather(-1, order)


def inverse(index: torch.Tensor, pyramid_len: int) -> torch.Tensor:
    """(B, H, P) int32: the slot of each pyramid entry in the selection ``index``, or -1."""
    slots = torch.arange(index.shape[2], device=index.device, dtype=torch.int32).expand(index.shape)
    return index.new_full((*index.shape[:2], pyramid_len), -1, dtype=torch.int32).scatter(2, index, slots)


def entry_levels(index: torch.Tensor, n: int, levels: int, p: int) -> torch.Tensor:
    """Level of each flat pyramid index."""
    bounds = torch.tensor(level_offsets(n, levels, p)[1:-1], device=index.device)
    return torch.bucketize(index, bounds, right=True)


def rotated_pyramid(x: torch.Tensor, levels: int, p: int,
                    rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, pool(x)) of unrotated x with every pyramid entry rotated at the last position it covers, (j+1)·p^l − 1,
    by ``rotate(rows, positions)`` (RoPE after selection, stated on the whole pyramid)."""
    n = x.shape[2]
    last = torch.cat([torch.arange(1, n // p**lvl + 1) * p**lvl - 1 for lvl in range(levels)]).to(x.device)
    whole = rotate(torch.cat([x, pool(x, levels, p)], dim=2), last)
    return whole[:, :, :n], whole[:, :, n:]


def take(x: torch.Tensor, pooled: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of the pyramid [x | pooled] at ``index`` (B, H, S) -> (B, H, S, d).

    x may have fewer heads than index (GQA): query head h reads kv head h // (H / H_kv); nothing is
    repeated over the whole sequence, only the S gathered rows are per query head.
    """
    b, hx, _, d = x.shape
    h, s = index.shape[1], index.shape[2]
    pyramid = torch.cat([x, pooled], dim=2)
    idx = index.reshape(b, hx, (h // hx) * s, 1).expand(-1, -1, -1, d)
    return pyramid.gather(2, idx).view(b, h, s, d)


def take_backward(
    grad: torch.Tensor, index: torch.Tensor, n: int, pooled_len: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``take`` w.r.t. (x, pooled): sum the rows' gradients back onto their pyramid entries."""
    b, h, s, d = grad.shape
    idx = index.reshape(b, kv_heads, (h // kv_heads) * s, 1).expand(-1, -1, -1, d)
    g = _acc(grad.reshape(b, kv_heads, -1, d))
    acc = g.new_zeros(b, kv_heads, n + pooled_len, d).scatter_add_(2, idx, g)
    return acc[:, :, :n].to(grad.dtype), acc[:, :, n:].to(grad.dtype)


def scatter(o: torch.Tensor, index: torch.Tensor, inv: torch.Tensor | None, n: int, levels: int, p: int
            ) -> torch.Tensor:
    """Decompress (B, H, S, d) entry outputs onto (B, H, N, d) base positions, with the causal shift.

    An entry of level l covering [b, b + p^l) adds its output to [b + p^l - 1, b + 2 p^l - 1) (clipped);
    contributions of different levels are summed (in fp32 or better).
    """
    b, h, s, d = o.shape
    offsets = level_offsets(n, levels, p)
    of = _acc(o)
    buf = of.new_zeros(b, h, offsets[-1], d).scatter(2, index.unsqueeze(-1).expand(-1, -1, -1, d), of)
    out = buf[:, :, :n]
    for lvl in range(1, levels):
        span = p**lvl
        level = buf[:, :, offsets[lvl] : offsets[lvl + 1]].repeat_interleave(span, dim=2)
        out = out + F.pad(level, (0, 0, span - 1, 0))[:, :, :n]
    return out.to(o.dtype)


def scatter_backward(grad: torch.Tensor, index: torch.Tensor, inv: torch.Tensor | None, levels: int, p: int
                     ) -> torch.Tensor:
    """Gradient of ``scatter`` w.r.t. the entry outputs: the sum of grad over each entry's shifted range."""
    b, h, n, d = grad.shape
    gf = _acc(grad)
    parts = [gf]
    for lvl in range(1, levels):
        span = p**lvl
        shifted = F.pad(gf[:, :, span - 1 :], (0, 0, 0, span - 1))
        parts.append(shifted.view(b, h, n // span, span, d).sum(dim=3))
    flat = torch.cat(parts, dim=2)
    return flat.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, d)).to(grad.dtype)


def lighthouse_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    levels: int,
    p: int,
    topk: int,
    tile_budget: int,
    scale: float | None = None,
    rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    scores: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The whole operator on a length that needs no padding, composed of the stages above with autograd.

    With ``rotate(x, positions)`` (the model's RoPE of rows x (B, H, M, d) at token positions (M,)), q and k come
    unrotated and RoPE is applied after selection: every pyramid entry is rotated at the last position it covers,
    (j+1)·p^l − 1, before the rows are taken. ``scores(q, k, v)`` gives another
    scorer's pyramids from the tensors as the operator receives them (default: the norm, ``score``).
    """
    n = q.shape[2]
    with torch.no_grad():
        s_qk, s_kq = score(q, k, levels, p) if scores is None else scores(q.detach(), k.detach(), v.detach())
        index = cascade(s_qk, s_kq, n, levels, p, topk, tile_budget)

    def pyramid(t: torch.Tensor, rotated: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return rotated_pyramid(t, levels, p, rotate) if rotated else (t, pool(t, levels, p))

    qg, kg, vg = (take(*pyramid(t, rotate is not None and t is not v), index) for t in (q, k, v))
    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
    return scatter(o, index, None, n, levels, p)


# -- the stages, with lhcompile.kernels' signatures (``inv`` is the kernels' business; the oracle reads index) --


def select(s_qk: torch.Tensor, s_kq: torch.Tensor, g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """``cascade`` and its inverse map."""
    index = cascade(s_qk, s_kq, g.n, g.levels, g.p, g.topk, g.tile_budget)
    return index, inverse(index, g.pyramid_len)


def gather(x: torch.Tensor, index: torch.Tensor, inv: torch.Tensor, levels: int, p: int) -> torch.Tensor:
    """Pyramid rows of x at ``index``, pooled from x."""
    return take(x, pool(x, levels, p), index)


def gather_backward(grad: torch.Tensor, index: torch.Tensor, inv: torch.Tensor, n: int, kv_heads: int, levels: int,
                    p: int) -> torch.Tensor:
    """Gradient of ``gather`` w.r.t. x: through ``take``, then through ``pool``."""
    grad_x, grad_pooled = take_backward(grad, index, n, level_offsets(n, levels, p)[-1] - n, kv_heads)
    return grad_x + pool_backward(grad_pooled, n, levels, p)


def select_documents(s_qk: torch.Tensor, s_kq: torch.Tensor, docs: torch.Tensor, gathered_len: int, g: Geometry
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cascade`` on each document of a relaid stream on its own (``lhcompile.documents``): its stretch of every
    pyramid level is a pyramid of its own, and its entries land at its place in the output row; entries past the
    last document's point at the stream's last position (always empty) and are in no inverse map.

    ``docs`` (3, D) int32: per document, its coarsest entries before it, its coarsest entries per tile (0: no
    document), where its entries start in the row. ``g`` is the geometry of the whole stream (batch 1)."""
    b, h, total = s_qk.shape
    index = torch.full((b, h, gathered_len), g.n - 1, dtype=torch.int64, device=s_qk.device)
    used = 0
    for first, coarse, out in docs.t().tolist():
        if not coarse:
            continue
        n, start = coarse * g.tiles * g.coarsest_span, first * g.coarsest_span
        mine = [slice(g.offsets[lvl] + start // g.p**lvl, g.offsets[lvl] + (start + n) // g.p**lvl)
                for lvl in range(g.levels)]
        local = cascade(torch.cat([s_qk[..., s] for s in mine], -1), torch.cat([s_kq[..., s] for s in mine], -1),
                        n, g.levels, g.p, g.topk, g.tile_budget)
        lvl = entry_levels(local, n, g.levels, g.p)
        shift = torch.tensor([s.start - o for s, o in zip(mine, level_offsets(n, g.levels, g.p))], device=local.device)
        index[:, :, out : out + local.shape[2]] = local + shift[lvl]
        used = max(used, out + local.shape[2])
    inv = index.new_full((b, h, total), -1, dtype=torch.int32)
    return index, inv.scatter(2, index[:, :, :used], torch.arange(used, dtype=torch.int32,
                                                                    device=index.device).expand(b, h, used))


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (M, W) -> (len(rows), W): row ``rows[i]`` of x, or zeros where it is -1."""
    return torch.where((rows >= 0)[:, None], x.index_select(0, rows.clamp(min=0)), 0)
