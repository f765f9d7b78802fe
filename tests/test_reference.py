"""The reference stages compute exactly what docs/algorithm.md specifies."""

from __future__ import annotations

import pytest
import torch

from lhcompile import LighthouseConfig
from lhcompile.operator import reference as R

from . import naive

# (n, levels, p, topk, tile_budget): hand-sized cases and the paper's settings at their shortest length
CASES = [
    (32, 2, 2, 8, 4),
    (64, 3, 2, 8, 4),
    (256, 3, 4, 16, 4),
    (96, 2, 4, 12, 6),
    (32768, 3, 4, 2048, 128),
]
SMALL_CASES = CASES[:4]  # the loop oracles are too slow at the paper's sizes


def _entries(index, n, levels, p):
    offsets = R.level_offsets(n, levels, p)
    lv = R.entry_levels(index, n, levels, p)
    return [
        [[(int(l), int(i) - offsets[int(l)]) for l, i in zip(lv[b, h], index[b, h])] for h in range(index.shape[1])]
        for b in range(index.shape[0])
    ]


def test_select_hand_checked():
    # N=16, L=2, p=2, k=4, one tile of 8 coarse entries: 2 picked by ||q|| (1, 6), then 2 by ||k|| among the rest (3, 0)
    n, levels, p = 16, 2, 2
    s_qk = torch.zeros(1, 1, 24)
    s_kq = torch.zeros(1, 1, 24)
    s_qk[0, 0, 16:] = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.15, 0.05, 0.8, 0.12])
    s_kq[0, 0, 16:] = torch.tensor([0.7, 0.1, 0.2, 0.95, 0.3, 0.1, 0.99, 0.05])
    index = R.cascade(s_qk, s_kq, n, levels, p, topk=4, tile_budget=4)
    # level-1 entry i has flat index 16 + i; selected parents sit after their two children
    assert index[0, 0].tolist() == [0, 1, 16, 2, 3, 17, 18, 6, 7, 19, 20, 21, 12, 13, 22, 23]


def test_scatter_hand_checked():
    # N=8, L=2, p=2: level-1 entry 1 covers tokens [2, 4) and lands on [3, 5); level-0 entry 6 lands on itself
    index = torch.tensor([[[6, 9]]])  # level-1 offset is 8, so 9 is level-1 entry 1
    o = torch.tensor([[[[1.0], [10.0]]]])
    out = R.scatter(o, index, None, 8, 2, 2)
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 10, 10, 0, 1, 0]


@pytest.mark.parametrize("n,levels,p,topk,budget", SMALL_CASES)
def test_select_matches_spec_loops(n, levels, p, topk, budget):
    q, k = torch.randn(2, 2, n, 8), torch.randn(2, 1, n, 8)
    s_qk, s_kq = R.score(q, k, levels, p)
    index = R.cascade(s_qk, s_kq, n, levels, p, topk, budget)
    assert _entries(index, n, levels, p) == naive.select(s_qk, s_kq, n, levels, p, topk, budget)


@pytest.mark.parametrize("n,levels,p,topk,budget", CASES)
def test_selection_structure(n, levels, p, topk, budget):
    b, h = (1, 2) if n > 4096 else (2, 3)
    cfg = LighthouseConfig(levels=levels, pooling_factor=p, topk=topk, tile_budget=budget)
    s_qk, s_kq = R.score(torch.randn(b, h, n, 4), torch.randn(b, h, n, 4), levels, p)
    index = R.cascade(s_qk, s_kq, n, levels, p, topk, budget)
    assert index.shape == (b, h, cfg.gathered_len(n))
    assert index.shape[-1] == n // p ** (levels - 1) + (levels - 1) * p * topk
    lv = R.entry_levels(index, n, levels, p)
    offsets = torch.tensor(R.level_offsets(n, levels, p))
    local = index - offsets[lv]
    start, span = local * p**lv, p**lv
    for bb in range(b):
        for hh in range(h):
            assert index[bb, hh].unique().numel() == index.shape[-1]
            counts = torch.bincount(lv[bb, hh], minlength=levels).tolist()
            assert counts == [p * topk] * (levels - 1) + [n // p ** (levels - 1)]
            # an entry is descended iff one of its children is emitted; descended entries sit after their span
            child_parent = set()
            for l_, i_ in zip(lv[bb, hh].tolist(), local[bb, hh].tolist()):
                if l_ < levels - 1:
                    child_parent.add((l_ + 1, i_ // p))
            ends, covered = [], torch.zeros(n, dtype=torch.int64)
            for l_, i_, s_ in zip(lv[bb, hh].tolist(), local[bb, hh].tolist(), start[bb, hh].tolist()):
                if (l_, i_) in child_parent:
                    ends.append(s_ + p**l_ - 2.0 ** (-l_))
                else:
                    ends.append(float(s_))
                    covered[s_ : s_ + p**l_] += 1
            assert ends == sorted(ends), "entries are not in position-key order"
            # the non-descended entries tile the sequence exactly: no holes, no overlaps
            assert bool((covered == 1).all())
            # each tile sends tile_budget entries down per level, so every emitted parent has p children
            for l_ in range(1, levels - 1):
                assert sum(1 for pl, _ in child_parent if pl == l_) == topk
    assert span.min() >= 1


@pytest.mark.parametrize("n,levels,p,topk,budget", SMALL_CASES)
def test_pool_gather_scatter_match_spec_loops(n, levels, p, topk, budget):
    q, k = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8)
    s_qk, s_kq = R.score(q, k, levels, p)
    index = R.cascade(s_qk, s_kq, n, levels, p, topk, budget)
    ents = _entries(index, n, levels, p)
    kg = R.take(k, R.pool(k, levels, p), index)
    for b in range(2):
        for h in range(4):
            want = torch.stack([naive.pooled_row(k[b], lvl, i, p)[h // 2] for lvl, i in ents[b][h]])
            torch.testing.assert_close(kg[b, h].double(), want, rtol=1e-6, atol=1e-6)
    o = torch.randn(2, 4, index.shape[-1], 8)
    torch.testing.assert_close(R.scatter(o, index, None, n, levels, p).double(), naive.scatter(o, ents, n, p), rtol=1e-5, atol=1e-6)


def test_scores_are_norms_then_span_max():
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 1, 16, 8)
    s_qk, s_kq = R.score(q, k, 3, 2)
    norms = q.norm(dim=-1)
    torch.testing.assert_close(s_qk[..., :16], norms)
    torch.testing.assert_close(s_qk[..., 16:24], norms.view(1, 2, 8, 2).amax(-1))
    torch.testing.assert_close(s_qk[..., 24:], norms.view(1, 2, 4, 4).amax(-1))
    assert s_kq.shape == (1, 1, 28)


def test_explicit_backward_formulas_match_autograd():
    n, levels, p = 64, 3, 2
    x = torch.randn(2, 2, n, 4, dtype=torch.float64, requires_grad=True)
    pooled = R.pool(x, levels, p)
    g = torch.randn_like(pooled)
    (auto,) = torch.autograd.grad(pooled, x, g)
    torch.testing.assert_close(R.pool_backward(g, n, levels, p), auto)

    s_qk, s_kq = R.score(x.detach(), x.detach(), levels, p)
    index = R.cascade(s_qk.repeat(1, 2, 1), s_kq, n, levels, p, 8, 4)  # 4 query heads over 2 kv heads
    pooled = pooled.detach().requires_grad_()
    rows = R.take(x, pooled, index)
    g = torch.randn_like(rows)
    auto = torch.autograd.grad(rows, (x, pooled), g)
    for mine, want in zip(R.take_backward(g, index, n, pooled.shape[2], 2), auto):
        torch.testing.assert_close(mine, want)

    o = torch.randn(2, 4, index.shape[-1], 4, dtype=torch.float64, requires_grad=True)
    out = R.scatter(o, index, None, n, levels, p)
    g = torch.randn_like(out)
    (auto,) = torch.autograd.grad(out, o, g)
    torch.testing.assert_close(R.scatter_backward(g, index, None, levels, p), auto)
