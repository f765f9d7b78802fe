"""Triton kernels for the memory-bound Lighthouse stages (everything except the dense attention).

Each kernel matches one stage of ``lhcompile.reference`` and is tested against it. None uses atomics:
every output element is written by exactly one program, which sums its inputs in a fixed order, so
results and gradients are bit-identical run to run. The trick that makes this possible is the inverse
map ``inv`` (B, H, P) int32 built by ``select``: for every pyramid entry, its slot in the gathered
sub-sequence, or -1. The two "scatter-like" passes (scatter forward, gather backward) then become pulls:
each base position reads, per level, the one entry that covers it.

Grids put the long axis first (CUDA allows 2^31 - 1 programs there, 65535 on the others), and all
address arithmetic is in int64, so no sequence length or batch size hits a launch or overflow limit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..geometry import Geometry, level_offsets


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along its last axis, as every kernel reads whole rows (other strides are free)."""
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def _level_offset(n, LVL: tl.constexpr, LOG_P: tl.constexpr):
    """Start of level LVL in a flat pyramid over n base entries."""
    off = n * 0
    for j in tl.static_range(LVL):
        off += n >> (LOG_P * j)
    return off


# -- scores ----------------------------------------------------------------------------------------


@triton.jit
def _score_kernel(
    x_ptr, s_ptr, n, heads, total, d, sx_b, sx_h, sx_n,
    LEVELS: tl.constexpr, LOG_P: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n)[:, None] & (cols < d)[None, :]
    ptr = x_ptr + b * sx_b + h * sx_h + rows.to(tl.int64)[:, None] * sx_n + cols[None, :]
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    s0 = tl.sqrt(tl.sum(x * x, axis=1))
    out = s_ptr + bh * total
    tl.store(out + rows, s0, mask=rows < n)
    for lvl in tl.static_range(1, LEVELS):
        # level lvl has ROWS >> (LOG_P * lvl) entries in this block (written inline: they must stay constexpr)
        s = tl.max(tl.reshape(s0, (ROWS >> (LOG_P * lvl), 1 << (LOG_P * lvl))), axis=1)
        idx = pid * (ROWS >> (LOG_P * lvl)) + tl.arange(0, ROWS >> (LOG_P * lvl))
        tl.store(out + _level_offset(n, lvl, LOG_P) + idx, s, mask=idx < (n >> (LOG_P * lvl)))


def score_pyramid(x: torch.Tensor, levels: int, p: int) -> torch.Tensor:
    """Flat fp32 score pyramid of x (B, H, N, d): ||x_i|| at level 0, span maxima above (reference.score)."""
    x = _rows(x)
    b, h, n, d = x.shape
    total = level_offsets(n, levels, p)[-1]
    out = torch.empty(b, h, total, device=x.device, dtype=torch.float32)
    rows = max(p ** (levels - 1), 32)
    grid = (triton.cdiv(n, rows), b * h)
    wrap_triton(_score_kernel)[grid](
        x, out, n, h, total, d, x.stride(0), x.stride(1), x.stride(2),
        LEVELS=levels, LOG_P=p.bit_length() - 1, ROWS=rows, BLOCK_D=triton.next_power_of_2(d),
    )
    return out


def score(q: torch.Tensor, k: torch.Tensor, levels: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.score: the score pyramids of q and k."""
    return score_pyramid(q, levels, p), score_pyramid(k, levels, p)


# -- selection -------------------------------------------------------------------------------------


@triton.jit
def _candidate_bits(s_ptr, cand_ptr, flag_ptr, i, size, EXCLUDE: tl.constexpr):
    """Scores of candidates i as int32 bit patterns (order-preserving for scores >= 0); -1 if not eligible."""
    valid = i < size
    c = tl.load(cand_ptr + i, mask=valid, other=0)
    u = tl.load(s_ptr + c, mask=valid, other=0.0).to(tl.int32, bitcast=True)
    if EXCLUDE:
        valid &= tl.load(flag_ptr + i, mask=valid, other=1) == 0
    return tl.where(valid, u, -1)


@triton.jit
def _pick_top(s_ptr, cand_ptr, flag_ptr, size, MARK: tl.constexpr, EXCLUDE: tl.constexpr, K: tl.constexpr,
              BLOCK: tl.constexpr):
    """Flag (with MARK) the K best eligible candidates; ties go to the earlier candidate.

    The K-th largest bit pattern is found by bisection over counts, so any candidate count works with
    registers for one BLOCK only.
    """
    lo = tl.full((), 0, tl.int64)
    hi = tl.full((), 0x7FFFFFFF, tl.int64)
    for _ in range(31):
        mid = lo + (hi - lo + 1) // 2
        count = tl.full((), 0, tl.int64)
        for start in range(0, size, BLOCK):
            u = _candidate_bits(s_ptr, cand_ptr, flag_ptr, start + tl.arange(0, BLOCK), size, EXCLUDE)
            count += tl.sum((u >= mid).to(tl.int64), axis=0)
        enough = count >= K
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = tl.full((), 0, tl.int64)
    for start in range(0, size, BLOCK):
        u = _candidate_bits(s_ptr, cand_ptr, flag_ptr, start + tl.arange(0, BLOCK), size, EXCLUDE)
        above += tl.sum((u > lo).to(tl.int64), axis=0)
    need = K - above
    tied_before = tl.full((), 0, tl.int64)
    for start in range(0, size, BLOCK):
        i = start + tl.arange(0, BLOCK)
        u = _candidate_bits(s_ptr, cand_ptr, flag_ptr, i, size, EXCLUDE)
        tied = u == lo
        rank = tl.cumsum(tied.to(tl.int64), axis=0) + tied_before
        tied_before += tl.sum(tied.to(tl.int64), axis=0)
        tl.store(flag_ptr + i, MARK, mask=(u > lo) | (tied & (rank <= need)))


@triton.jit
def _position_key(c, flag, LVL: tl.constexpr, TOP: tl.constexpr, LOG_P: tl.constexpr):
    """Integer position key (units of 2^-TOP tokens) of level-LVL entries c; flag != 0 marks 'descended'."""
    span = 1 << (LVL * LOG_P)
    start = c.to(tl.int64) * span
    return tl.where(flag != 0, ((start + span) << TOP) - (1 << (TOP - LVL)), start << TOP)


@triton.jit
def _count_keys_below(cand_ptr, flag_ptr, size, nbits, key, LVL: tl.constexpr, TOP: tl.constexpr,
                      LOG_P: tl.constexpr, BLOCK: tl.constexpr):
    """How many of a level's emitted entries (keys ascending along the list) have a key < key (vectorised)."""
    lo = tl.zeros((BLOCK,), tl.int32)
    hi = tl.zeros((BLOCK,), tl.int32) + size
    for _ in range(nbits):
        open_ = lo < hi
        mid = (lo + hi) // 2
        c = tl.load(cand_ptr + mid, mask=open_, other=0)
        f = tl.load(flag_ptr + mid, mask=open_, other=0)
        right = open_ & (_position_key(c, f, LVL, TOP, LOG_P) < key)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(open_ & ~right, mid, hi)
    return lo


@triton.jit
def _select_kernel(
    sqk_ptr, skq_ptr, index_ptr, inv_ptr, cand_ptr, flag_ptr, docs_ptr,
    n, heads, group, tiles, slots, row_len, coarse, nbits_coarse,
    LEVELS: tl.constexpr, LOG_P: tl.constexpr, HALF: tl.constexpr, NBITS_CHILD: tl.constexpr,
    BLOCK: tl.constexpr, DOCS: tl.constexpr,
):
    # one program per (batch, head, document, tile); scratch: candidate list and flags of every level, coarse
    # first, in the tile's own stretch of the output row (a tile emits exactly as many entries as it lists).
    # Without DOCS each row is one document of the whole sequence; with DOCS (batch 1) the table docs_ptr gives
    # each document's coarsest entries before it, its coarsest entries per tile (0: no document) and where its
    # entries start in the output row.
    TOP: tl.constexpr = LEVELS - 1
    P: tl.constexpr = 1 << LOG_P
    CHILD: tl.constexpr = 2 * HALF * P
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % tiles
    doc = (pid // tiles) % slots
    bh = pid // (tiles * slots)
    first = tl.full((), 0, tl.int64)
    out = tl.full((), 0, tl.int64)
    if DOCS:
        first = tl.load(docs_ptr + doc).to(tl.int64)
        coarse = tl.load(docs_ptr + slots + doc)
        out = tl.load(docs_ptr + 2 * slots + doc).to(tl.int64)
    child = CHILD * (coarse > 0)
    emitted = coarse + TOP * child
    bkv = (bh // heads) * (heads // group) + (bh % heads) // group
    total = _level_offset(n, LEVELS, LOG_P)
    sqk = sqk_ptr + bh * total
    skq = skq_ptr + bkv * total
    tile_row = bh * row_len + out + tile * emitted
    cand = cand_ptr + tile_row
    flag = flag_ptr + tile_row
    lanes = tl.arange(0, BLOCK)

    for start in range(0, coarse, BLOCK):
        i = start + lanes
        tl.store(cand + i, (first + tile * coarse + i).to(tl.int32), mask=i < coarse)
        tl.store(flag + i, tl.zeros((BLOCK,), tl.int8), mask=i < coarse)
    tl.debug_barrier()

    # top-down: pick 2 x HALF per level, their children are the next level's candidates
    for lvl in tl.static_range(TOP, 0, -1):
        size = coarse * (lvl == TOP) + child * (lvl != TOP)
        base = (coarse + (TOP - 1 - lvl) * child) * (lvl != TOP)
        off = _level_offset(n, lvl, LOG_P)
        _pick_top(sqk + off, cand + base, flag + base, size, 1, False, HALF, BLOCK)
        tl.debug_barrier()
        _pick_top(skq + off, cand + base, flag + base, size, 2, True, HALF, BLOCK)
        tl.debug_barrier()
        child_base = coarse + (TOP - lvl) * child
        children = tl.arange(0, P)[None, :]
        picked_before = tl.full((), 0, tl.int32)
        for start in range(0, size, BLOCK):
            i = start + lanes
            picked = (tl.load(flag + base + i, mask=i < size, other=0) != 0) & (i < size)
            c = tl.load(cand + base + i, mask=i < size, other=0)
            rank = tl.cumsum(picked.to(tl.int32), axis=0) - 1 + picked_before
            picked_before += tl.sum(picked.to(tl.int32), axis=0)
            dst = child_base + rank[:, None] * P + children
            tl.store(cand + dst, c[:, None] * P + children, mask=picked[:, None])
            tl.store(flag + dst, tl.zeros((BLOCK, P), tl.int8), mask=picked[:, None])
        tl.debug_barrier()

    # rank of an entry in the tile = number of emitted entries (all levels) with a smaller position key;
    # along each level's list keys ascend, so that is its own list position plus a binary search per level
    for lvl in tl.static_range(TOP, -1, -1):
        size = coarse * (lvl == TOP) + child * (lvl != TOP)
        base = (coarse + (TOP - 1 - lvl) * child) * (lvl != TOP)
        off = _level_offset(n, lvl, LOG_P)
        for start in range(0, size, BLOCK):
            i = start + lanes
            valid = i < size
            c = tl.load(cand + base + i, mask=valid, other=0)
            key = _position_key(c, tl.load(flag + base + i, mask=valid, other=0), lvl, TOP, LOG_P)
            rank = i.to(tl.int64)
            for other in tl.static_range(TOP, -1, -1):
                if other != lvl:
                    o_size = coarse * (other == TOP) + child * (other != TOP)
                    o_base = (coarse + (TOP - 1 - other) * child) * (other != TOP)
                    o_bits = nbits_coarse * (other == TOP) + NBITS_CHILD * (other != TOP)
                    rank += _count_keys_below(cand + o_base, flag + o_base, o_size, o_bits, key, other, TOP,
                                              LOG_P, BLOCK)
            slot = out + tile * emitted + rank
            tl.store(index_ptr + bh * row_len + slot, off + c.to(tl.int64), mask=valid)
            tl.store(inv_ptr + bh * total + off + c, slot.to(tl.int32), mask=valid)


def _select(s_qk: torch.Tensor, s_kq: torch.Tensor, g: Geometry, index: torch.Tensor, docs: torch.Tensor | None,
            coarse: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the selection into ``index`` (B, H, row) over the documents of ``docs`` (or one per row)."""
    b, h, total = s_qk.shape
    slots = 1 if docs is None else docs.shape[1]
    inv = torch.full((b, h, total), -1, device=s_qk.device, dtype=torch.int32)
    cand = torch.empty_like(index, dtype=torch.int32)
    flag = torch.empty_like(index, dtype=torch.int8)
    child = g.children_per_tile
    wrap_triton(_select_kernel)[(b * h * slots * g.tiles,)](
        s_qk, s_kq, index, inv, cand, flag, index if docs is None else docs,
        g.n, h, h // s_kq.shape[1], g.tiles, slots, index.shape[2], coarse, coarse.bit_length(),
        LEVELS=g.levels, LOG_P=g.p.bit_length() - 1, HALF=g.tile_budget // 2, NBITS_CHILD=child.bit_length(),
        BLOCK=min(1024, triton.next_power_of_2(max(coarse, child))), DOCS=docs is not None,
    )
    return index, inv


def select(s_qk: torch.Tensor, s_kq: torch.Tensor, g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.select: the selection (B, H, S) and its inverse map (B, H, P) int32 (slot of each entry, or -1)."""
    b, h, _ = s_qk.shape
    index = torch.empty(b, h, g.gathered_len, device=s_qk.device, dtype=torch.int64)
    return _select(s_qk, s_kq, g, index, None, g.coarse_per_tile)


def select_documents(s_qk: torch.Tensor, s_kq: torch.Tensor, docs: torch.Tensor, gathered_len: int, g: Geometry
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.select_documents: every document of the relaid stream (``lhcompile.documents``) selects on its
    own; the entries past the last document's point at the stream's last (always empty) position."""
    b, h, _ = s_qk.shape
    index = torch.full((b, h, gathered_len), g.n - 1, device=s_qk.device, dtype=torch.int64)
    coarse = g.n // g.coarsest_span // g.tiles  # no document has more coarsest entries per tile than the stream
    return _select(s_qk, s_kq, g, index, docs, coarse)


# -- segment sums: gather forward (mean over the span) and scatter backward (sum over the shifted span) --


@triton.jit
def _segment_kernel(
    x_ptr, index_ptr, out_ptr, n, heads, group, s_len, d,
    sx_b, sx_h, sx_n, so_b, so_h, so_s,
    LEVELS: tl.constexpr, LOG_P: tl.constexpr, SHIFT: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    hx = h // group
    s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    s_ok = s < s_len
    idx = tl.load(index_ptr + bh * s_len + s, mask=s_ok, other=0)
    lvl = tl.zeros((BLOCK_S,), tl.int64)
    lvl_start = tl.zeros((BLOCK_S,), tl.int64)
    for j in tl.static_range(1, LEVELS):
        off = _level_offset(n, j, LOG_P)
        lvl = tl.where(idx >= off, j, lvl)
        lvl_start = tl.where(idx >= off, off, lvl_start)
    span = tl.full((BLOCK_S,), 1, tl.int64) << (LOG_P * lvl)
    first = (idx - lvl_start) * span
    if SHIFT:
        first += span - 1
    x_base = x_ptr + b * sx_b + hx * sx_h + cols[None, :]
    acc = tl.zeros((BLOCK_S, BLOCK_D), tl.float32)
    for j in range(0, tl.max(tl.where(s_ok, span, 0), axis=0)):
        row = first + j
        mask = (s_ok & (j < span) & (row < n))[:, None] & (cols < d)[None, :]
        acc += tl.load(x_base + row[:, None] * sx_n, mask=mask, other=0.0).to(tl.float32)
    if MEAN:
        acc = acc / span[:, None].to(tl.float32)
    out = out_ptr + b * so_b + h * so_h + s.to(tl.int64)[:, None] * so_s + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=s_ok[:, None] & (cols < d)[None, :])


def _segment(x: torch.Tensor, index: torch.Tensor, n: int, levels: int, p: int, *, shift: bool, mean: bool
             ) -> torch.Tensor:
    x = _rows(x)
    b, h, s_len = index.shape
    d = x.shape[3]
    # token-major, as a model's projections lay out q, k and v: attention kernels read it as they read theirs, and
    # the documents' varlen kernels take its rows (S, H, d) as they are
    out = torch.empty(b, s_len, h, d, device=x.device, dtype=x.dtype).transpose(1, 2)
    block_s = 32
    grid = (triton.cdiv(s_len, block_s), b * h)
    wrap_triton(_segment_kernel)[grid](
        x, index, out, n, h, h // x.shape[1], s_len, d,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        LEVELS=levels, LOG_P=p.bit_length() - 1, SHIFT=shift, MEAN=mean,
        BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(d),
    )
    return out


def gather(x: torch.Tensor, index: torch.Tensor, inv: torch.Tensor, levels: int, p: int) -> torch.Tensor:
    """reference.gather: pyramid rows at ``index`` (B, H, S) pooled on the fly from x (B, H_kv, N, d)."""
    return _segment(x, index, x.shape[2], levels, p, shift=False, mean=True)


def scatter_backward(grad: torch.Tensor, index: torch.Tensor, inv: torch.Tensor, levels: int, p: int
                     ) -> torch.Tensor:
    """reference.scatter_backward: each entry's gradient is the sum over its shifted output range."""
    return _segment(grad, index, grad.shape[2], levels, p, shift=True, mean=False)


# -- pulls through the inverse map: scatter forward and gather backward ----------------------------


@triton.jit
def _pull_kernel(
    y_ptr, inv_ptr, out_ptr, n, heads, group, total, d,
    sy_b, sy_h, sy_s, so_b, so_h, so_n,
    LEVELS: tl.constexpr, LOG_P: tl.constexpr, SHIFT: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # out[b, ho, t] = sum over levels, then over the group's heads h, of (w *) y[b, h, slot of the entry
    # that covers t]; entries not emitted (slot -1) contribute nothing
    pid = tl.program_id(0)
    bo = tl.program_id(1).to(tl.int64)
    out_heads = heads // group
    b, ho = bo // out_heads, bo % out_heads
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    t_ok = t < n
    col_ok = (cols < d)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for lvl in tl.static_range(LEVELS):
        span = 1 << (LOG_P * lvl)
        if SHIFT:
            entry = (t + 1) // span - 1
        else:
            entry = t // span
        covered = t_ok & (entry >= 0)
        off = _level_offset(n, lvl, LOG_P)
        for g in range(group):
            h = ho * group + g
            slot = tl.load(inv_ptr + (b * heads + h) * total + off + entry, mask=covered, other=-1)
            rows = y_ptr + b * sy_b + h * sy_h + slot.to(tl.int64)[:, None] * sy_s + cols[None, :]
            y = tl.load(rows, mask=(slot >= 0)[:, None] & col_ok, other=0.0).to(tl.float32)
            if MEAN:
                y = y / span
            acc += y
    out = out_ptr + b * so_b + ho * so_h + t.to(tl.int64)[:, None] * so_n + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & col_ok)


def _pull(y: torch.Tensor, inv: torch.Tensor, n: int, out_heads: int, levels: int, p: int, *, shift: bool,
          mean: bool) -> torch.Tensor:
    y = _rows(y)
    b, h, _, d = y.shape
    out = torch.empty(b, n, out_heads, d, device=y.device, dtype=y.dtype).transpose(1, 2)  # token-major
    block_t = 32
    grid = (triton.cdiv(n, block_t), b * out_heads)
    wrap_triton(_pull_kernel)[grid](
        y, inv, out, n, h, h // out_heads, inv.shape[2], d,
        y.stride(0), y.stride(1), y.stride(2), out.stride(0), out.stride(1), out.stride(2),
        LEVELS=levels, LOG_P=p.bit_length() - 1, SHIFT=shift, MEAN=mean,
        BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d),
    )
    return out


def scatter(o: torch.Tensor, index: torch.Tensor, inv: torch.Tensor, n: int, levels: int, p: int) -> torch.Tensor:
    """reference.scatter: entry outputs added onto base positions from the last token they summarise on."""
    return _pull(o, inv, n, o.shape[1], levels, p, shift=True, mean=False)


def gather_backward(grad: torch.Tensor, index: torch.Tensor, inv: torch.Tensor, n: int, kv_heads: int, levels: int,
                    p: int) -> torch.Tensor:
    """Gradient of ``gather`` w.r.t. x (B, H_kv, N, d): each entry's gradient spread / p^l over its span."""
    return _pull(grad, inv, n, kv_heads, levels, p, shift=False, mean=True)


# -- rows through a map: the relayout of packed documents (lhcompile.documents) ------------------------------


@triton.jit
def _take_rows_kernel(x_ptr, map_ptr, out_ptr, rows_out, width, sx_row, so_row, BLOCK_R: tl.constexpr,
                      BLOCK_W: tl.constexpr):
    # out[r] = x[map[r]] where map[r] >= 0, else 0: one read and one write of each row
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    src = tl.load(map_ptr + r, mask=r < rows_out, other=-1)
    ok = (src >= 0)[:, None] & (cols < width)[None, :]
    x = tl.load(x_ptr + src.to(tl.int64)[:, None] * sx_row + cols[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * so_row + cols[None, :], x,
             mask=(r < rows_out)[:, None] & (cols < width)[None, :])


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (M, W) -> (len(rows), W): row ``rows[i]`` of x, or zeros where it is -1 (reference.take_rows)."""
    x = _rows(x)
    out = torch.empty(rows.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
    block_w = min(1024, triton.next_power_of_2(x.shape[1]))
    grid = (triton.cdiv(rows.shape[0], 8), triton.cdiv(x.shape[1], block_w))
    wrap_triton(_take_rows_kernel)[grid](x, rows, out, rows.shape[0], x.shape[1], x.stride(0), out.stride(0),
                                         BLOCK_R=8, BLOCK_W=block_w)
    return out
