"""The functional operator: properties a user relies on, on random inputs, fp32 and bf16."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import lhcompile
from lhcompile import LighthouseConfig, lighthouse_attention
from lhcompile.operator import reference as R

SMALL = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4)
CONFIGS = [
    SMALL,
    LighthouseConfig(levels=3, pooling_factor=2, topk=8, tile_budget=4),
    LighthouseConfig(levels=3, pooling_factor=4, topk=16, tile_budget=4),
]
DTYPES = [torch.float32, torch.bfloat16]


def qkv(b, h, hkv, n, d, dtype=torch.float32, requires_grad=False):
    make = lambda heads: torch.randn(b, heads, n, d, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return make(h), make(hkv), make(hkv)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_forward_and_backward(cfg, dtype):
    n = cfg.min_lighthouse_len * 2
    q, k, v = qkv(2, 3, 3, n, 16, dtype, requires_grad=True)
    out = lighthouse_attention(q, k, v, cfg)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    # float64 oracle on the same inputs (selection made from the same scores)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = R.lighthouse_reference(q64, k64, v64, levels=cfg.levels, p=cfg.pooling_factor, topk=cfg.topk, tile_budget=cfg.tile_budget)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), g.double())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    for mine, ref in zip(grads, want_grads):
        torch.testing.assert_close(mine.double(), ref, **tol)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_path_is_causal(cfg, dtype):
    n = cfg.min_lighthouse_len * 2
    q, k, v = qkv(2, 4, 2, n, 8, dtype)
    out = lighthouse_attention(q, k, v, cfg)
    for t in (0, n // 3, n - 2):
        v2 = v.clone()
        v2[:, :, t + 1 :] = torch.randn_like(v2[:, :, t + 1 :]) * 5
        out2 = lighthouse_attention(q, k, v2, cfg)
        assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1]), f"out[:{t + 1}] changed with future v"
        assert not torch.equal(out[:, :, t + 1 :], out2[:, :, t + 1 :])


@pytest.mark.parametrize("cfg", CONFIGS)
def test_future_queries_and_keys_move_earlier_outputs_only_within_their_tile(cfg):
    # the paper's design (docs/algorithm.md): a tile's selection reads the norms of all its tokens, so a Lighthouse
    # layer is no causal language model within a tile, and its training-mode loss is no causal LM loss. Across
    # tiles it is causal, and through values everywhere (test_value_path_is_causal)
    n = cfg.min_lighthouse_len * 2
    tiles = cfg.geometry(n).tiles
    tile = n // tiles
    q, k, v = qkv(2, 2, 2, n, 8)
    out = lighthouse_attention(q, k, v, cfg)
    moved_within = []
    for j in range(1, tiles):
        start, later = j * tile, j * tile + tile // 2
        q2, k2 = q.clone(), k.clone()
        q2[:, :, later : start + tile] *= 30  # the tile's later half takes over its selection by both norms
        k2[:, :, later : start + tile] *= 30
        out2 = lighthouse_attention(q2, k2, v, cfg)
        assert torch.equal(out[:, :, :start], out2[:, :, :start]), f"tile {j} moved outputs of earlier tiles"
        moved_within.append(not torch.equal(out[:, :, start:later], out2[:, :, start:later]))
    assert all(moved_within), "a tile's earlier outputs should follow its later tokens' norms"


def test_gradcheck_float64():
    cfg = SMALL
    q, k, v = qkv(1, 2, 1, 32, 4, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: lighthouse_attention(a, b, c, cfg), (q, k, v))


def test_gqa_equals_repeated_kv_without_repeating():
    cfg = CONFIGS[1]
    q, k, v = qkv(2, 6, 2, 64, 8, requires_grad=True)
    out = lighthouse_attention(q, k, v, cfg)
    kr, vr = (t.detach().repeat_interleave(3, dim=1).requires_grad_() for t in (k, v))
    want = lighthouse_attention(q.detach(), kr, vr, cfg)
    torch.testing.assert_close(out, want)
    gk, gv = torch.autograd.grad(out.sum(), (k, v))
    gkr, gvr = torch.autograd.grad(want.sum(), (kr, vr))
    torch.testing.assert_close(gk, gkr.view(2, 2, 3, 64, 8).sum(2))
    torch.testing.assert_close(gv, gvr.view(2, 2, 3, 64, 8).sum(2))


def test_value_head_dim_may_differ():
    q, k, _ = qkv(1, 2, 2, 32, 8)
    v = torch.randn(1, 2, 32, 4)
    assert lighthouse_attention(q, k, v, SMALL).shape == (1, 2, 32, 4)


def test_scale_is_honoured():
    q, k, v = qkv(1, 2, 2, 32, 8)
    a = lighthouse_attention(q, k, v, SMALL, scale=0.5)
    b = lighthouse_attention(q * (0.5 * 8**0.5), k, v, SMALL)  # same logits, same norms order
    assert not torch.equal(a, lighthouse_attention(q, k, v, SMALL))
    # selection uses ||q||, so compare on the gathered logits only through the reference with a fixed index
    s_qk, s_kq = R.score(q, k, 2, 2)
    index = R.cascade(s_qk, s_kq, 32, 2, 2, 8, 4)
    qg, kg, vg = (R.take(t, R.pool(t, 2, 2), index) for t in (q, k, v))
    want = R.scatter(F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=0.5), index, None, 32, 2, 2)
    torch.testing.assert_close(a, want)
    assert b.shape == a.shape


def test_short_sequences_fall_back_to_dense_sdpa():
    cfg = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, min_seq_len=64)
    q, k, v = qkv(1, 4, 2, 48, 8)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(lighthouse_attention(q, k, v, cfg), want)
    assert LighthouseConfig().min_lighthouse_len == 16 * 2048


@pytest.mark.parametrize("n", [40, 50, 63])
def test_lengths_that_do_not_tile_are_zero_padded(n):
    cfg = SMALL  # tiles need N to be a multiple of 2 * 2 = 4... and T * p^(L-1) = 4
    q, k, v = qkv(2, 2, 2, n, 8, requires_grad=True)
    out = lighthouse_attention(q, k, v, cfg)
    assert out.shape == q.shape
    padded = cfg.padded_len(n)
    pad = lambda t: F.pad(t, (0, 0, 0, padded - n))  # noqa: E731
    torch.testing.assert_close(out, lighthouse_attention(pad(q), pad(k), pad(v), cfg)[:, :, :n])
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_norm_low_precision_inputs_stay_finite(dtype):
    # norms beyond the type's range (||q|| up to 4e4 * sqrt(16) > 65504 in fp16) must not overflow the scores,
    # and pooling large values must not overflow its sums. (v is kept moderate: the output sums up to L
    # attention outputs, so it can reach L * max|v|, as in the paper's operator.)
    q, k, v = qkv(1, 2, 2, 64, 16, dtype)
    big = 1e4 if dtype == torch.float16 else 1e17  # bf16: logits stay below its max, as dense SDPA needs
    q, k = q.clamp(-4, 4) * big, k.clamp(-4, 4) * big
    assert torch.isfinite(F.scaled_dot_product_attention(q, k, v, is_causal=True)).all()
    out = lighthouse_attention(q, k, v, CONFIGS[1])
    assert torch.isfinite(out).all()


def test_bad_inputs_are_rejected_with_a_reason():
    q, k, v = qkv(1, 2, 2, 32, 8)
    with pytest.raises(ValueError, match="causal-only"):
        lighthouse_attention(q, k, v, SMALL, is_causal=False)
    with pytest.raises(ValueError, match="head dims differ"):
        lighthouse_attention(q, torch.randn(1, 2, 32, 4), v, SMALL)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        lighthouse_attention(torch.randn(1, 3, 32, 8), k, v, SMALL)
    with pytest.raises(ValueError, match="sequence length"):
        lighthouse_attention(q, k[:, :, :16], v[:, :, :16], SMALL)
    with pytest.raises(ValueError, match="one floating dtype"):
        lighthouse_attention(q, k.half(), v, SMALL)


@pytest.mark.parametrize(
    "field,value,rule",
    [
        ("pooling_factor", 3, "power of two"),
        ("levels", 1, ">= 2"),
        ("topk", 100, "multiple of tile_budget=128"),
        ("tile_budget", 5, "even"),
        ("scorer", "gla", "not implemented"),
        ("dilation", 6, "power of two"),
        ("inner_attention", "xformers", "'sdpa' or 'flash_attn'"),
        ("dense_layers", [0, 1], "tuple of ints"),
        ("min_seq_len", -1, ">= 0"),
        ("rope", "after_pooling", "'before_pooling' (the paper's order) or 'after_selection'"),
    ],
)
def test_config_rejects_bad_values_naming_field_value_rule(field, value, rule):
    with pytest.raises(ValueError) as err:
        LighthouseConfig(**{field: value})
    assert f"{field}={value!r}" in str(err.value) and rule in str(err.value)


def test_the_derived_minimum_length_says_which_field_sets_it():
    with pytest.raises(TypeError, match="min_lighthouse_len is derived.*pass min_seq_len"):
        LighthouseConfig(min_lighthouse_len=16)
    assert LighthouseConfig(min_seq_len=10**6).min_lighthouse_len == 10**6
    assert LighthouseConfig().min_lighthouse_len == 16 * 2048  # p^(L-1) * topk
    assert dataclasses.replace(LighthouseConfig(), topk=1024).min_lighthouse_len == 16 * 1024


def test_config_is_frozen_and_hashable():
    cfg = LighthouseConfig()
    with pytest.raises(AttributeError):
        cfg.topk = 1  # type: ignore[misc]
    assert hash(cfg) == hash(LighthouseConfig())
    assert cfg.gathered_len(131072) == 24576  # the example of docs/algorithm.md


def test_custom_ops_pass_opcheck():
    n, levels, p = 32, 2, 2
    q, k, v = qkv(2, 4, 2, n, 8, requires_grad=True)
    ops = torch.ops.lhcompile
    s_qk, s_kq = ops.score(q.detach(), k.detach(), levels, p)
    index, inv = ops.select(s_qk, s_kq, n, levels, p, 8, 4)
    o = torch.randn(2, 4, index.shape[-1], 8, requires_grad=True)
    torch.library.opcheck(ops.score, (q.detach(), k.detach(), levels, p))
    torch.library.opcheck(ops.select, (s_qk, s_kq, n, levels, p, 8, 4))
    torch.library.opcheck(ops.gather, (k, index, inv, levels, p))
    torch.library.opcheck(ops.scatter, (o, index, inv, n, levels, p))


def test_runs_under_torch_compile_without_graph_breaks():
    cfg = CONFIGS[1]
    q, k, v = qkv(2, 4, 2, 64, 8, requires_grad=True)
    fn = torch.compile(lambda a, b, c: lighthouse_attention(a, b, c, cfg), fullgraph=True, backend="inductor")
    out = fn(q, k, v)
    want = lighthouse_attention(q, k, v, cfg)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    gw = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_package_exports_small_typed_api():
    assert {"LighthouseConfig", "lighthouse_attention"} <= set(lhcompile.__all__)


def test_flash_attn_backend_calls_flash_attn_in_its_own_layout(monkeypatch):
    # no flash-attn wheel exists here: a stand-in with flash_attn_func's signature and (B, S, H, d) layout
    calls = []

    def flash_attn_func(q, k, v, *, causal, softmax_scale):
        calls.append((tuple(q.shape), causal, softmax_scale))
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    q, k, v = qkv(2, 4, 2, SMALL.min_lighthouse_len * 2, 8)
    flash = dataclasses.replace(SMALL, inner_attention="flash_attn")
    out = lighthouse_attention(q, k, v, flash, scale=0.3)
    torch.testing.assert_close(out, lighthouse_attention(q, k, v, SMALL, scale=0.3), rtol=1e-6, atol=1e-6)
    assert calls == [((2, SMALL.gathered_len(q.shape[2]), 4, 8), True, 0.3)]


def test_flash_attn_backend_without_the_package_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail
    q, k, v = qkv(1, 2, 2, SMALL.min_lighthouse_len, 8)
    with pytest.raises(RuntimeError, match="install flash-attn or use inner_attention='sdpa'"):
        lighthouse_attention(q, k, v, dataclasses.replace(SMALL, inner_attention="flash_attn"))
