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
