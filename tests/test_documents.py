"""Lighthouse per document: the operator against the loop over documents on the single-sequence operator, nothing
crossing a boundary, the documents' constructors, and dense attention within documents."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import pytest
import torch

import lhcompile
import lhcompile.operator.documents.attention
import lhcompile.operator.reference
from lhcompile.operator.documents import planner
from lhcompile.operator.documents.planner import PLANNER
from lhcompile import Documents, LighthouseConfig, Rotary, document_attention, lighthouse_attention

CONFIGS = [
    LighthouseConfig(levels=3, pooling_factor=2, topk=8, tile_budget=4),  # long: >= 32 tokens, tiles of 8
    LighthouseConfig(levels=2, pooling_factor=4, topk=16, tile_budget=4),  # long: >= 64 tokens, tiles of 16
]
# per batch row, its documents' lengths; each row sums to N (boundaries off p^l and tiles on purpose)
N = 192
MIXES = {
    "one long": [[192], [192]],
    "two long": [[101, 91], [64, 128]],
    "long + many short": [[70, 3, 1, 5, 33, 80], [150, *[7] * 6]],
    "all short": [[20, 11, 1, 30, 31, 19, 25, 30, 25], [3] * 64],
    "shorter than a coarsest block": [[1, 2, 3, 101, 2, 83], [2] * 96],
    "one whole row, one of short documents": [[192], [3] * 64],
}


def starts_of(rows: list[list[int]]) -> torch.Tensor:
    starts = torch.zeros(len(rows), sum(rows[0]), dtype=torch.bool)
    for b, lengths in enumerate(rows):
        assert sum(lengths) == starts.shape[1]
        starts[b, torch.tensor([0, *lengths[:-1]]).cumsum(0)] = True
    return starts


def per_document(q, k, v, rows, config, rotate=None):
    """The oracle: each document on its own, Lighthouse if long enough, else dense causal attention."""
    out = []
    for b, lengths in enumerate(rows):
        start, row = 0, []
        for n in lengths:
            qd, kd, vd = (t[b : b + 1, :, start : start + n] for t in (q, k, v))
            rope = None if rotate is None else rotate(n)
            row.append(lighthouse_attention(qd, kd, vd, config, rope=rope))
            start += n
        out.append(torch.cat(row, dim=2))
    return torch.cat(out)


def qkv(b, h, hkv, n, d, dtype, grad=True):
    return tuple(torch.randn(b, heads, n, d, dtype=dtype, requires_grad=grad) for heads in (h, hkv, hkv))


@pytest.mark.parametrize("config", CONFIGS, ids=["L3p2", "L2p4"])
@pytest.mark.parametrize("mix", MIXES)
def test_equals_the_loop_over_documents_forward_and_backward(config, mix):
    rows = MIXES[mix]
    q, k, v = qkv(2, 4, 2, N, 8, torch.float64)
    out = lighthouse_attention(q, k, v, config, documents=Documents(starts_of(rows)))
    want = per_document(q, k, v, rows, config)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for mine, ref in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_against_the_float64_oracle(dtype):
    config, rows = CONFIGS[0], MIXES["long + many short"]
    q, k, v = qkv(2, 4, 4, N, 16, dtype)
    out = lighthouse_attention(q, k, v, config, documents=Documents(starts_of(rows)))
    assert out.dtype == dtype
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = per_document(q64, k64, v64, rows, config)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    g = torch.randn_like(want)
    for mine, ref in zip(torch.autograd.grad(out, (q, k, v), g.to(dtype)), torch.autograd.grad(want, (q64, k64, v64), g)):
        torch.testing.assert_close(mine.double(), ref, **tol)


def test_changing_one_document_changes_no_other_document_bit_for_bit():
    config, rows = CONFIGS[0], [[70, 3, 1, 40, 78], [33, 60, 99]]
    starts = starts_of(rows)
    q, k, v = qkv(2, 4, 2, N, 8, torch.float32)
    g = torch.randn(2, 4, N, 8)

    def run(q, k, v):
        out = lighthouse_attention(q, k, v, config, documents=Documents(starts))
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    before = run(q, k, v)
    for b, start, stop in ((0, 74, 114), (0, 73, 74), (1, 93, 192)):  # a long one, a one-token one, a row's last
        q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
        for t in (q2, k2, v2):
            t[b, :, start:stop] = torch.randn_like(t[b, :, start:stop]) * 3
        after = run(*(t.requires_grad_() for t in (q2, k2, v2)))
        outside = torch.ones(2, N, dtype=torch.bool)
        outside[b, start:stop] = False
        for x, y in zip(before, after):
            assert torch.equal(x.transpose(1, 2)[outside], y.transpose(1, 2)[outside]), "another document changed"
        assert not torch.equal(before[0][b, :, start:stop], after[0][b, :, start:stop])


@pytest.mark.parametrize("mix", ["long + many short", "one long"])
def test_rope_after_selection_restarts_with_each_document(mix):
    config, rows = CONFIGS[0], MIXES[mix]
    half = 4
    inv = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)

    def tables(positions):
        angles = positions.double()[..., None] * inv
        return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])
    q, k, v = qkv(2, 4, 2, N, 2 * half, torch.float64)
    out = lighthouse_attention(q, k, v, config, rope=Rotary.of("rotate_half", *tables(positions)),
                               documents=Documents.from_positions(positions))
    want = per_document(q, k, v, rows, config, rotate=lambda n: Rotary.of("rotate_half", *tables(torch.arange(n))))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_dense_document_attention_is_causal_attention_within_each_document():
    rows = MIXES["long + many short"]
    q, k, v = qkv(2, 4, 2, N, 8, torch.float64)
    out = document_attention(q, k, v, Documents(starts_of(rows)))
    want = per_document(q, k, v, rows, LighthouseConfig(min_seq_len=10**6))  # every document dense
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for mine, ref in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_dense_document_attention_reads_the_documents_once_for_forward_and_backward(compiled, monkeypatch):
    # reading them waits for the GPU: the backward takes the forward's host copy instead of reading them again
    reads = []
    attention = lhcompile.operator.documents.attention
    host_flags = attention.host_flags
    monkeypatch.setattr(attention, "host_flags", lambda *a: reads.append(1) or host_flags(*a))
    rows = MIXES["long + many short"]
    q, k, v = qkv(2, 4, 2, N, 8, torch.float32)
    attend = lambda q, k, v, s: document_attention(q, k, v, Documents(s))  # noqa: E731
    f = torch.compile(attend, backend="aot_eager", fullgraph=True) if compiled else attend
    out = f(q, k, v, starts_of(rows))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    assert len(reads) == 1
    want = per_document(q, k, v, rows, LighthouseConfig(min_seq_len=10**6))
    for mine, ref in ((out, want), *zip(grads, torch.autograd.grad(want, (q, k, v), g))):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_under_autocast_q_k_and_v_run_in_its_dtype_as_sdpa_would():
    # fp32 master weights under bf16 autocast: the projections give bf16, a rotation with fp32 tables turns q and k
    # back into fp32, and SDPA (the call these ops stand for) casts all three to bf16. Before, the op got mixed
    # dtypes: refused on CPU, and on a GPU it took the fp32 reference path with a score matrix per document.
    rows = MIXES["long + many short"]
    q, k, v = qkv(2, 4, 2, N, 8, torch.float32)
    v16 = v.detach().bfloat16().requires_grad_()
    documents = Documents(starts_of(rows))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = document_attention(q, k, v16, documents)
        lighthouse = lighthouse_attention(q, k, v16, CONFIGS[0], documents=documents)
    cast = [t.detach().bfloat16().requires_grad_() for t in (q, k, v16)]
    for out, config in ((dense, LighthouseConfig(min_seq_len=10**6)), (lighthouse, CONFIGS[0])):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, lighthouse_attention(*cast, config, documents=documents), rtol=0, atol=0)
        out.float().sum().backward()
        assert q.grad.dtype == torch.float32 and v16.grad.dtype == torch.bfloat16
        q.grad = k.grad = v16.grad = None
    with pytest.raises(ValueError, match="one dtype.*torch.float32, torch.float32 and torch.bfloat16"):
        document_attention(q, k, v16, documents)


def test_inside_a_cuda_graph_capture_it_says_it_cannot_be_captured_and_what_to_do(monkeypatch):
    # torchtitan captures its whole training step in a CUDA graph by default; per document syncs with the host
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    q, k, v = qkv(2, 4, 2, N, 8, torch.float32)
    for attention in (document_attention, functools.partial(lighthouse_attention, config=CONFIGS[0])):
        with pytest.raises(RuntimeError, match="CUDA graph cannot capture.*--training.disable_cuda_graphs"):
            attention(q, k, v, documents=Documents(starts_of(MIXES["two long"])))


def test_the_constructors_agree_and_refuse_bad_boundaries_naming_them():
    rows = [[5, 20, 7], [32]]
    starts = starts_of(rows)
    cu = torch.tensor([0, 5, 25, 32, 64], dtype=torch.int32)
    ids = torch.tensor([[0] * 5 + [1] * 20 + [2] * 7, [4] * 32])
    positions = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])
    for documents in (Documents.from_cu_seqlens(cu, length=32, batch=2), Documents.from_ids(ids),
                      Documents.from_positions(positions)):
        assert torch.equal(documents.starts, starts)
    for bad, rule in (([1, 5, 64], "must start at 0"), ([0, 5, 60], "must end at batch \\* length = 64"),
                      ([0, 25, 5, 64], "must not decrease"), ([0, 5, 40, 64], "every row's start")):
        with pytest.raises(ValueError, match=f"cu_seqlens=.*{rule}"):
            Documents.from_cu_seqlens(torch.tensor(bad), length=32, batch=2)
    with pytest.raises(ValueError, match="ids decrease along a row"):
        Documents.from_ids(torch.tensor([[0, 0, 1, 0]]))
    q, k, v = qkv(2, 2, 2, 32, 8, torch.float32, grad=False)
    with pytest.raises(ValueError, match="documents are on meta, q on cpu"):
        lighthouse_attention(q, k, v, CONFIGS[0], documents=Documents(starts.to("meta")))
    with pytest.raises(ValueError, match=r"documents.starts must be a bool \(B, N\) = \(2, 32\)"):
        lighthouse_attention(q, k, v, CONFIGS[0], documents=Documents(starts[:, :16]))


def test_document_lengths_are_data_compiled_once_for_every_mix(recorded):
    config = CONFIGS[0]
    graphs = recorded
    f = torch.compile(lambda q, k, v, s: lighthouse_attention(q, k, v, config, documents=Documents(s)),
                      backend=recorded, fullgraph=True, dynamic=False)
    q, k, v = qkv(2, 4, 2, N, 8, torch.float32, grad=False)
    for rows in MIXES.values():
        torch.testing.assert_close(f(q, k, v, starts_of(rows)), per_document(q, k, v, rows, config))
    assert len(graphs) == 1


def test_eagerly_the_documents_of_a_batch_pick_the_work(monkeypatch):
    # the general path's stages are sized for the most long documents a batch could hold, so a batch with none
    # runs dense attention alone, and one of a document per row plain Lighthouse (a choice on the host, eagerly):
    # counted at the relay of the long documents and at the single-sequence selection
    calls = {"relay": 0, "select": 0}
    take_rows, select = lhcompile.operator.reference.take_rows, lhcompile.operator.reference.select

    def count(name, fn):
        return lambda *args, **kwargs: calls.__setitem__(name, calls[name] + 1) or fn(*args, **kwargs)

    monkeypatch.setattr(lhcompile.operator.reference, "take_rows", count("relay", take_rows))
    monkeypatch.setattr(lhcompile.operator.reference, "select", count("select", select))
    config = CONFIGS[0]
    q, k, v = qkv(2, 4, 2, N, 8, torch.float32)
    for mix, path in (("all short", None), ("one long", "select"), ("two long", "relay"),
                      ("one whole row, one of short documents", "relay")):
        calls.update(relay=0, select=0)
        out = lighthouse_attention(q, k, v, config, documents=Documents(starts_of(MIXES[mix])))
        out.sum().backward()
        assert [name for name, n in calls.items() if n] == ([path] if path else []), mix


def test_cudnn_sees_a_bounded_set_of_shapes_however_documents_vary(monkeypatch):
    # cuDNN builds an execution plan (~0.4-0.8 s) per new shape: widths that follow each batch's document lengths
    # made every batch of real documents build plans (the uneven torchtitan steps of BENCHMARKS.md)
    from lhcompile.operator.documents.forms import Segments
    from lhcompile.operator.documents.planner import MIN_WIDTH, padded_width

    lengths = torch.randint(1, 1 << 20, (20000,)).tolist() + list(range(1, 300))
    widths = {n: padded_width(n) for n in lengths}
    for n, w in widths.items():
        assert n <= w <= max(n + n / 16, MIN_WIDTH)
    for octave in range(4, 20):
        assert len({w for w in widths.values() if 1 << octave <= w < 2 << octave}) <= 16
    monkeypatch.setattr(PLANNER, "admitted", set())
    monkeypatch.setattr(PLANNER, "cudnn_min_batch", 1)  # batches of any size here: see the next test
    key = (8, 128, 128, torch.bfloat16)
    # documents of one width run together: 9000 and 9100 (padded), three 20s (two of them, consecutive and exact: a
    # view), 8191 in both rows (short, padded), 785 in both rows, two 10240s (a view); 8192 (long) alone, 10544 alone
    # (padded); 3, the third 20 and 4669 (short, in no batch) in one flash varlen call
    rows = [[9000, 3, 20, 20, 20, 8192, 8191, 9100, 785, 4669], [8191, 10240, 10240, 785, 10544]]
    tokens = torch.arange(2 * 40000)
    calls = PLANNER.calls(Segments.of(starts_of(rows), None), key)
    assert [(c.shape, c.start, c.cu is None) for c in calls] == [
        ((2, 9216), None, True), ((2, 20), 9003, True), ((1, 8192), 9063, True), ((2, 8192), None, True),
        ((2, 800), None, True), ((2, 10240), 48191, True), ((1, 10752), None, True), ((4692,), None, False)]

    def own_tokens(call):
        return [tokens[i][o].tolist() for i, o in zip(call.index, call.own)]

    assert own_tokens(calls[0]) == [list(range(0, 9000)), list(range(25446, 34546))]
    assert own_tokens(calls[3]) == [list(range(17255, 25446)), list(range(40000, 48191))]
    assert own_tokens(calls[4]) == [list(range(34546, 35331)), list(range(68671, 69456))]
    assert own_tokens(calls[6]) == [list(range(69456, 80000))]
    assert calls[6].index[0, -1] == 79999  # padding repeats the document's last token
    flash = calls[-1]
    assert flash.cu.tolist() == [0, 3, 23, 4692] and flash.longest == 4669
    assert flash.index.tolist() == [*range(9000, 9003), *range(9043, 9063), *range(35331, 40000)]
    # one call for every token is read and written as a view
    (whole,) = PLANNER.calls(Segments.of(starts_of([[64] * 4, [64] * 4]), None), key)
    assert whole.shape == (8, 64) and whole.covers(512)
    # past batch_shapes shapes, batches of short documents run on flash and long ones one at a time; shapes
    # admitted before stay admitted, so a backward takes its forward's calls
    admitted = set(PLANNER.admitted)
    assert len(admitted) == 6
    monkeypatch.setattr(PLANNER, "batch_shapes", 6)
    assert [(c.shape, c.start) for c in PLANNER.calls(Segments.of(starts_of(rows), None), key)] == [
        (c.shape, c.start) for c in calls]
    other = PLANNER.calls(Segments.of(starts_of(rows), None), (16, 64, 64, torch.bfloat16))
    assert [c.shape for c in other] == [(1, 9216), (1, 9216), (1, 8192), (1, 10240), (1, 10240), (1, 10752),
                                        (3 + 60 + 8191 + 785 + 4669 + 8191 + 785,)]
    assert PLANNER.admitted == admitted


def test_short_documents_run_on_cudnn_only_in_batches_of_cudnn_min_batch_positions(monkeypatch):
    # small cuDNN batches beside a flash varlen call were slower than flash varlen on every document (BENCHMARKS.md)
    from lhcompile.operator.documents.forms import Segments

    monkeypatch.setattr(PLANNER, "admitted", set())
    rows = [[PLANNER.cudnn_min_batch // 16] * 16 + [785, 785, 3]]
    calls = PLANNER.calls(Segments.of(starts_of(rows), None), (8, 128, 128, torch.bfloat16))
    assert [(c.shape, c.start, c.cu is None) for c in calls] == [((16, PLANNER.cudnn_min_batch // 16), 0, True),
                                                                 ((785 + 785 + 3,), PLANNER.cudnn_min_batch, False)]


@pytest.mark.parametrize("mix", ["16 x 8K", "128 x 1K", "mixed rows", "lognormal ~1K", "lognormal ~3K"])
def test_the_share_of_work_on_cudnn_is_what_document_attentions_calls_run_there(mix, monkeypatch):
    # the pass runs a batch of short documents on document_attention where most of its work runs on cuDNN there
    from benchmarks.bench import MIXES
    from lhcompile.operator.documents.forms import Segments
    from lhcompile.operator.documents.planner import DENSE_SHARE

    monkeypatch.setattr(PLANNER, "admitted", set())
    rows = ([[9000, 3, 20, 20, 20, 8192, 8191, 9100, 785, 4669], [8191, 10240, 10240, 785, 10544]]
            if mix == "mixed rows" else [MIXES[mix]])
    lengths = [n for row in rows for n in row]
    share = PLANNER.cudnn_share(lengths)
    calls = PLANNER.calls(Segments.of(starts_of(rows), None), (8, 128, 128, torch.bfloat16))
    on_cudnn = sum((int(own.sum()) if own is not None else width) ** 2
                   for call in calls if call.cu is None for width in [call.shape[1]]
                   for own in (call.own if call.own is not None else [None] * call.shape[0]))
    assert share == pytest.approx(on_cudnn / sum(n * n for n in lengths))
    # documents of one length run on cuDNN whole; at random lengths short documents are mostly alone in their width
    assert (share >= DENSE_SHARE) == (mix in ("16 x 8K", "128 x 1K", "mixed rows")), share
    monkeypatch.setattr(PLANNER, "cudnn_min_length", None)
    assert PLANNER.cudnn_share(lengths) == 0


def _causal_math(q, k, v, scale, lse=None):
    """Causal attention of one sequence, (H, n, d) q and (H_kv, n, d) k, v, in fp64: probabilities (from ``lse``
    where given, as a backward kernel takes them), log-sum-exp, and k, v with every query head."""
    h, n = q.shape[0], q.shape[1]
    k, v = (x.double().repeat_interleave(h // x.shape[0], 0) for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -torch.inf)
    lse = s.logsumexp(-1) if lse is None else lse.double()
    return (s - lse[..., None]).exp(), lse, k, v


def _causal_math_backward(g, q, k, v, out, lse, scale):
    """The gradients from the forward's output and log-sum-exp, as flash's and cuDNN's backward kernels take them."""
    p, _, k_all, v_all = _causal_math(q, k, v, scale, lse)
    g = g.double()
    ds = p * (g @ v_all.transpose(-1, -2) - (g * out.double()).sum(-1, keepdim=True))
    dk, dv = (x.unflatten(0, (k.shape[0], -1)).sum(1) for x in (ds.transpose(-1, -2) @ q.double() * scale,
                                                              p.transpose(-1, -2) @ g))
    return tuple(x.to(q.dtype) for x in (ds @ k_all * scale, dk, dv))


ATEN = torch.ops.aten


class _KernelsAsMath:
    """The aten attention kernels that document_attention's GPU path calls, as the math they compute, to their
    contracts: flash varlen on (T, H, d) rows with GQA and an (H, T) log-sum-exp; cuDNN on (G, H, W, d) with every
    head and a (G, H, W, 1) log-sum-exp. The kernels themselves, to the same contracts, are checked on a GPU by
    test_cuda_dense_document_attention_equals_the_masked_reference."""

    def __getattr__(self, name):
        return getattr(ATEN, name)

    @staticmethod
    def _flash_attention_forward(q, k, v, cu, _cu, _max_q, _max_k, _dropout, causal, _debug, scale):
        assert causal and q.dim() == 3
        out, lse = torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
        for a, b in itertools.pairwise(cu.tolist()):
            p, m, _, v_all = _causal_math(*(x[a:b].transpose(0, 1) for x in (q, k, v)), scale)
            out[a:b], lse[:, a:b] = (p @ v_all).transpose(0, 1), m
        return out, lse, None, None, None

    @staticmethod
    def _flash_attention_backward(g, q, k, v, out, lse, cu, _cu, _max_q, _max_k, _dropout, causal, _seed, _offset,
                                  scale):
        assert causal and lse.shape == (q.shape[1], q.shape[0])
        grads = [torch.empty_like(x) for x in (q, k, v)]
        for a, b in itertools.pairwise(cu.tolist()):
            for total, part in zip(grads, _causal_math_backward(*(x[a:b].transpose(0, 1) for x in (g, q, k, v, out)),
                                                                lse[:, a:b], scale)):
                total[a:b] = part.transpose(0, 1)
        return tuple(grads)

    @staticmethod
    def _scaled_dot_product_cudnn_attention(q, k, v, _bias, _lse, _dropout, causal, _debug, scale):
        assert causal and q.shape == k.shape  # cuDNN's path gets every head
        parts = [_causal_math(q[i], k[i], v[i], scale) for i in range(q.shape[0])]
        return torch.stack([p @ v_all for p, _, _, v_all in parts]).to(q.dtype), torch.stack(
            [m for _, m, _, _ in parts]).float().unsqueeze(-1)

    @staticmethod
    def _scaled_dot_product_cudnn_attention_backward(g, q, k, v, out, lse, _seed, _offset, _bias, _cu_q, _cu_k,
                                                     _max_q, _max_k, _dropout, causal, scale):
        assert causal and q.shape == k.shape and lse.shape == (*q.shape[:3], 1)
        return tuple(torch.stack(x) for x in zip(*(_causal_math_backward(g[i], q[i], k[i], v[i], out[i], lse[i, ..., 0],
                                                                         scale) for i in range(q.shape[0]))))


GPU_PATH_MIXES = {
    # consecutive documents of one width (views), others padded to theirs, lone ones, a row of one document
    "mixed": [[200, 3, 1, 100, 98, 16, 16, 16, 58, 4], [16, 16, 16, 464]],
    "one width": [[64] * 8, [64] * 8],  # one call for every token
}


@pytest.mark.parametrize("cudnn_min_length", [1, 100, None], ids=["cudnn", "cudnn+flash", "flash"])
@pytest.mark.parametrize("keep_some", [False, True], ids=["every document", "every other"])
@pytest.mark.parametrize("mix", GPU_PATH_MIXES)
@pytest.mark.parametrize("batch_shapes", [32, 0], ids=["batches", "no batch shapes left"])
def test_the_gpu_path_of_document_attention_places_what_its_kernels_compute(cudnn_min_length, keep_some, mix,
                                                                            batch_shapes, monkeypatch):
    # which documents go to which kernel, the views, gathers, placements, padding, GQA: run in CI with the kernels
    # as math
    rows = GPU_PATH_MIXES[mix]
    starts = starts_of(rows)
    keep = starts.long().cumsum(1) % 2 == 0 if keep_some else None
    q, k, v = qkv(2, 8, 2, 512, 16, torch.float32)
    want = document_attention(q, k, v, Documents(starts), keep=keep)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    monkeypatch.setattr(PLANNER, "cudnn_min_length", cudnn_min_length)
    monkeypatch.setattr(PLANNER, "batch_shapes", batch_shapes)
    monkeypatch.setattr(PLANNER, "admitted", set())
    monkeypatch.setattr(lhcompile.operator.documents.attention, "_implementation",
                        lambda q: (planner.gpu_forward, planner.gpu_backward))
    monkeypatch.setattr(torch.ops, "aten", _KernelsAsMath())
    out = document_attention(q, k, v, Documents(starts), keep=keep)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for mine, ref in ((out, want), *zip(grads, want_grads)):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_a_result_in_the_layout_the_op_promises_is_not_copied_whatever_the_stride_of_a_batch_of_one():
    # a compiled graph hands document_attention views of a model's (N, H, d) rows, whose batch stride is H * d; the
    # GPU path's results, (B * N, H, d) rows viewed back, have N * H * d: the same layout, which must not cost a copy
    # of every gradient in every layer. A result truly laid out otherwise is copied into the promised layout
    from lhcompile.operator.documents.attention import _laid_out_as

    n, h, d = 64, 4, 8
    promised = torch.empty_strided((1, h, n, d), (h * d, d, h * d, 1))
    result = torch.randn(n, h, d).view(1, n, h, d).transpose(1, 2)
    assert _laid_out_as(result, promised) is result
    other = torch.randn(1, h, n, d)
    copied = _laid_out_as(other, promised)
    assert copied is promised and copied.stride() == (h * d, d, h * d, 1) and torch.equal(copied, other)


# -- on a GPU: the Triton kernels, flash varlen and Inductor at lengths that need them --------------------------

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="the Triton kernels and flash varlen at long lengths need a CUDA GPU")
GPU_CONFIG = LighthouseConfig(topk=512)  # L3 p4: documents of 8192 tokens and more run Lighthouse
GPU_MIXES = {"one long": [[32768]], "long + short": [[9001, 7, 100, 12000, 11660]], "all short": [[1000] * 32 + [768]],
             "two rows": [[20000, 12768], [8192, 24576]]}


@needs_cuda
@pytest.mark.parametrize("mix", GPU_MIXES)
def test_cuda_selection_of_every_document_is_exactly_the_reference(mix):
    from lhcompile.operator import kernels
    from lhcompile.operator import reference as R
    from lhcompile.operator.documents.layout import Layout

    rows = GPU_MIXES[mix]
    starts = starts_of(rows).cuda()
    q, k, _ = (t.cuda() for t in qkv(len(rows), 8, 2, sum(rows[0]), 64, torch.bfloat16, grad=False))
    layout = Layout.of(starts, len(rows), starts.shape[1], GPU_CONFIG)
    s_qk, s_kq = kernels.score(layout.relay(q), layout.relay(k), 3, 4)
    g = GPU_CONFIG.geometry(0).__class__(layout.relaid_len, 3, 4, GPU_CONFIG.topk, GPU_CONFIG.tile_budget)
    want = R.select_documents(s_qk, s_kq, layout.docs, layout.gathered_len, g)
    got = kernels.select_documents(s_qk, s_kq, layout.docs, layout.gathered_len, g)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_cuda
@pytest.mark.parametrize("mix", GPU_MIXES)
def test_cuda_per_document_equals_the_loop_over_documents_in_bf16(mix):
    rows = GPU_MIXES[mix]
    q, k, v = (t.detach().cuda().requires_grad_() for t in qkv(len(rows), 8, 2, sum(rows[0]), 64, torch.bfloat16))
    out = lighthouse_attention(q, k, v, GPU_CONFIG, documents=Documents(starts_of(rows).cuda()))
    want = per_document(q, k, v, rows, GPU_CONFIG)  # the same kernels per document; cuDNN/flash SDPA inside
    g = torch.randn_like(out)
    for mine, ref in ((out, want), *zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g))):
        err = ((mine.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < 1e-2, err


@needs_cuda
@pytest.mark.parametrize("cudnn_min_length", [1, 300, None], ids=["cudnn", "cudnn+flash", "flash"])
@pytest.mark.parametrize("rows", [[[700, 3, 1, 300, 650, 394], [2048]], [[256] * 4 + [300, 290, 434], [512] * 2 + [1024]]],
                         ids=["lone documents", "batches of one width"])
@pytest.mark.parametrize("token_major", [False, True], ids=["(B, H, N, d)", "(B, N, H, d) transposed"])
def test_cuda_dense_document_attention_equals_the_masked_reference(cudnn_min_length, rows, token_major, monkeypatch):
    monkeypatch.setattr(PLANNER, "cudnn_min_length", cudnn_min_length)
    monkeypatch.setattr(PLANNER, "admitted", set())
    starts = starts_of(rows).cuda()
    q, k, v = (t.detach().cuda() for t in qkv(2, 8, 2, 2048, 64, torch.float32, grad=False))
    want = [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())]
    # a model's projections hand attention (B, N, H, d) tensors transposed: the kernels then read them as views
    got = [(t.transpose(1, 2).contiguous().transpose(1, 2) if token_major else t).bfloat16().requires_grad_()
           for t in (q, k, v)]
    out_ref = document_attention(*want, Documents(starts))  # fp32 on CUDA: the masked reference
    out = document_attention(*got, Documents(starts))  # bf16 on CUDA: the kernel
    g = torch.randn_like(out_ref)
    pairs = [(out, out_ref), *zip(torch.autograd.grad(out, got, g.bfloat16()), torch.autograd.grad(out_ref, want, g))]
    for mine, ref in pairs:
        assert ((mine.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-2


@needs_cuda
def test_cuda_torchtitans_flex_document_mask_under_inductor_runs_lighthouse_per_document():
    pytest.importorskip("torchtitan")
    from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention
    from torchtitan.models.common.attention import get_causal_mask_mod, get_document_mask_mod

    rows = [[9001, 7, 100, 12000, 11660]]
    positions = torch.cat([torch.arange(n) for n in rows[0]])[None].cuda()
    block_mask = create_block_mask(and_masks(get_causal_mask_mod(), get_document_mask_mod(positions)), 1, None,
                                   32768, 32768, device="cuda", _compile=True)

    class Flex(torch.nn.Module):
        def forward(self, q, k, v, block_mask):
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)

    model = Flex()
    lhcompile.apply(model, dataclasses.replace(GPU_CONFIG, dense_layers=()), compiler="inductor")
    q, k, v = (t.detach().cuda().requires_grad_() for t in qkv(1, 8, 2, 32768, 64, torch.bfloat16))
    out = model(q, k, v, block_mask)
    out.sum().backward()
    [site] = lhcompile.inspect(model)
    assert site.rewritten and site.documents, site.reason
    want = lighthouse_attention(q, k, v, GPU_CONFIG, documents=Documents.from_positions(positions))
    assert ((out.double() - want.double()).norm() / want.double().norm()).item() < 1e-2


@needs_cuda
@pytest.mark.parametrize("kind", ["varlen", "flex"])
def test_cuda_a_batch_of_short_documents_runs_the_faster_dense_kernel_through_the_pass(kind):
    # documents of one length run on document_attention (cuDNN batches), documents of many lengths on the model's
    # own kernel; either way dense attention within each document
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.attention.varlen import varlen_attn

    n = 32768

    class Model(torch.nn.Module):
        def forward(self, q, k, v, cu, longest, block_mask):
            if kind == "flex":
                return flex_attention(q, k, v, block_mask=block_mask)
            rows = [t.transpose(1, 2).reshape(n, -1, t.shape[3]) for t in (q, k, v)]
            return varlen_attn(*rows, cu, cu, longest, longest, window_size=(-1, 0)).view(1, n, 8, -1).transpose(1, 2)

    model = Model()
    lhcompile.apply(model, dataclasses.replace(GPU_CONFIG, dense_layers=()), compiler="inductor")
    many = [512 + 61 * i for i in range(40)]
    many = many[: next(i for i in range(len(many)) if sum(many[: i + 1]) >= n)]
    for lengths, graph in (([1024] * 32, "dense"), (many + [n - sum(many)], "as captured")):
        starts = starts_of([lengths]).cuda()
        cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).int()
        doc = starts.long().cumsum(1)[0]
        block_mask = create_block_mask(lambda b, h, i, j: (doc[i] == doc[j]) & (i >= j), 1, None, n, n,
                                       device="cuda", _compile=True)
        q, k, v = (t.detach().cuda().requires_grad_() for t in qkv(1, 8, 8, n, 64, torch.bfloat16))
        before = dict(lhcompile.inspect(model).variant_calls)
        out = model(q, k, v, cu, max(lengths), block_mask)
        calls = lhcompile.inspect(model).variant_calls
        assert {name for name in calls if calls[name] > before.get(name, 0)} == {graph}, (lengths, calls)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        wide = [t.detach().float().requires_grad_() for t in (q, k, v)]  # the reference, document by document
        want = document_attention(*wide, Documents(starts))
        for mine, ref in zip((out, *grads), (want, *torch.autograd.grad(want, wide, g.float()))):
            assert ((mine.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-2


def test_the_documents_ops_pass_torch_librarys_checks():
    # what the compiler is promised (fake kernels: shapes and strides, autograd registration) is what runs
    from lhcompile.operator import stages as ops
    from lhcompile.operator.documents.attention import _document_attention
    from lhcompile.operator.documents.layout import Layout, _relay, _unrelay

    config, rows = CONFIGS[0], MIXES["long + many short"]
    starts = starts_of(rows)
    q, k, v = qkv(2, 4, 2, N, 8, torch.float32)
    layout = Layout.of(starts, 2, N, config)
    maps = (layout.source, layout.relaid, layout.long)
    torch.library.opcheck(_document_attention, (q, k, v, starts, ~layout.long, 0.3))
    torch.library.opcheck(_relay, (q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(), *maps))
    relaid = _relay(q, *maps).detach().requires_grad_()
    torch.library.opcheck(_unrelay, (relaid, *maps))
    s_qk, s_kq = ops.score(relaid.detach(), _relay(k, *maps).detach(), config.levels, config.pooling_factor)
    torch.library.opcheck(ops.select_documents, (s_qk, s_kq, layout.docs, layout.gathered_len, layout.relaid_len,
                                                 config.levels, config.pooling_factor, config.topk,
                                                 config.tile_budget))
