"""Loop-by-loop restatements of docs/algorithm.md, written independently of lhcompile.reference.

They are slow on purpose: every loop is one sentence of the spec, so they serve as a second oracle.
"""

from __future__ import annotations

import torch


def select(s_qk, s_kq, n, levels, p, topk, budget):
    """Returns per (b, h) the list of (level, index) emitted, in position-key order."""
    b_, h_, _ = s_qk.shape
    group = h_ // s_kq.shape[1]
    offsets = [0]
    for lvl in range(levels):
        offsets.append(offsets[-1] + n // p**lvl)
    tiles = topk // budget
    top = levels - 1
    out = []
    for b in range(b_):
        row = []
        for h in range(h_):
            qk = s_qk[b, h].tolist()
            kq = s_kq[b, h // group].tolist()
            emitted = []  # (key, level, index)
            per_tile = n // p**top // tiles
            for t in range(tiles):
                cands = list(range(t * per_tile, (t + 1) * per_tile))
                for lvl in range(top, -1, -1):
                    span = p**lvl
                    chosen = []
                    if lvl > 0:
                        by_qk = sorted(cands, key=lambda i: (-qk[offsets[lvl] + i], i))[: budget // 2]
                        rest = [i for i in cands if i not in by_qk]
                        by_kq = sorted(rest, key=lambda i: (-kq[offsets[lvl] + i], i))[: budget // 2]
                        chosen = sorted(by_qk + by_kq)
                    for i in cands:
                        if i in chosen:
                            key = span * (i + 1) - 2.0 ** (-lvl)
                        else:
                            key = float(i * span)
                        emitted.append((key, lvl, i))
                    cands = [c * p + j for c in chosen for j in range(p)]
            emitted.sort()
            row.append([(lvl, i) for _, lvl, i in emitted])
        out.append(row)
    return out


def scatter(o, entries, n, p):
    """o: (B, H, S, d); entries[b][h] = [(level, index)] in the order of o's S axis."""
    out = torch.zeros(o.shape[0], o.shape[1], n, o.shape[3], dtype=torch.float64)
    for b, row in enumerate(entries):
        for h, ents in enumerate(row):
            for s, (lvl, i) in enumerate(ents):
                span = p**lvl
                lo, hi = i * span + span - 1, min(i * span + 2 * span - 1, n)
                if lo < n:
                    out[b, h, lo:hi] += o[b, h, s].double()
    return out


def pooled_row(x, lvl, i, p):
    """Mean of x (H, N, d) over the span of entry (lvl, i)."""
    span = p**lvl
    return x[:, i * span : (i + 1) * span].double().mean(dim=1)


def dilated_scores(q, k, v, levels, p, dilation, firsts=None):
    """The dilated scorer's pyramids by its definition (docs/algorithm.md §2): for each (b, h) and position t, causal
    softmax attention (scale 1/sqrt(d)) of t over the positions s <= t of its residue class (s = t mod dilation,
    counted from the first token of t's document: ``firsts[b]``, the sorted document starts of row b, default [0]),
    once with q as queries and k as keys, once with k as queries and q as keys, v the values; the L2 norm of each
    output is the level-0 score, a coarser entry's the max over its span. Returns s_qk, s_kq (B, H, P) float64."""
    b_, h_, n, d = q.shape
    group = h_ // k.shape[1]
    s_qk = torch.zeros(b_, h_, n, dtype=torch.float64)
    s_kq = torch.zeros(b_, h_, n, dtype=torch.float64)
    for b in range(b_):
        starts = firsts[b] if firsts is not None else [0]
        for h in range(h_):
            g = h // group
            for t in range(n):
                first = max(f for f in starts if f <= t)
                same = [s for s in range(first, t + 1) if (s - first) % dilation == (t - first) % dilation]
                for out, query, keys in ((s_qk, q[b, h, t], k[b, g, same]), (s_kq, k[b, g, t], q[b, h, same])):
                    weights = torch.softmax((keys.double() @ query.double()) / d**0.5, dim=0)
                    out[b, h, t] = torch.linalg.vector_norm(weights @ v[b, g, same].double())

    def pyramid(s0):
        return torch.cat([s0] + [s0.view(b_, h_, n // p**lvl, p**lvl).amax(-1) for lvl in range(1, levels)], dim=-1)

    return pyramid(s_qk), pyramid(s_kq)
