"""The Triton kernels against the pure-PyTorch reference.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on the small
shapes only; the large shapes need CUDA and are skipped without it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lhcompile import LighthouseConfig, lighthouse_attention
from lhcompile.operator import kernels
from lhcompile.operator import reference as R
from lhcompile.operator.stages import use_stages

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="large shapes need a CUDA GPU")
races_need_cuda = pytest.mark.skipif(
    not CUDA, reason="Triton's interpreter runs a kernel's programs one after another: only a GPU can show a race")

# (B, H, H_kv, N, d, config); odd batch and head counts on purpose
SMALL = [
    (1, 2, 1, 64, 8, LighthouseConfig(levels=3, pooling_factor=2, topk=8, tile_budget=4)),
    (3, 3, 3, 128, 16, LighthouseConfig(levels=2, pooling_factor=4, topk=8, tile_budget=4)),
    (1, 4, 2, 128, 12, LighthouseConfig(levels=3, pooling_factor=4, topk=8, tile_budget=4)),
]
LARGE = [
    (1, 8, 8, 16384, 128, LighthouseConfig(topk=1024)),
    (3, 6, 2, 32768, 64, LighthouseConfig(topk=1024)),
    (2, 5, 5, 24576, 128, LighthouseConfig(levels=2, pooling_factor=8, topk=1536)),
]
SHAPES = [pytest.param(*s, id=f"B{s[0]}H{s[1]}kv{s[2]}N{s[3]}d{s[4]}") for s in SMALL] + [
    pytest.param(*s, id=f"B{s[0]}H{s[1]}kv{s[2]}N{s[3]}d{s[4]}", marks=needs_cuda) for s in LARGE
]
DTYPES = [torch.float32, torch.bfloat16]


def rel_err(mine: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((mine.double() - want).norm() / want.norm()).item()


def inputs(b, h, hkv, n, d, dtype):
    return (torch.randn(b, heads, n, d, device=DEVICE, dtype=dtype) for heads in (h, hkv, hkv))


def scores_and_index(q, k, cfg):
    s_qk, s_kq = R.score(q, k, cfg.levels, cfg.pooling_factor)
    return s_qk, s_kq, R.select(s_qk, s_kq, cfg.geometry(q.shape[2]))


@pytest.mark.parametrize("b,h,hkv,n,d,cfg", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_score_kernel_matches_reference(b, h, hkv, n, d, cfg, dtype):
    q, k, _ = inputs(b, h, hkv, n, d, dtype)
    want_qk, want_kq = R.score(q, k, cfg.levels, cfg.pooling_factor)
    torch.testing.assert_close(kernels.score_pyramid(q, cfg.levels, cfg.pooling_factor), want_qk, rtol=2e-6, atol=0)
    torch.testing.assert_close(kernels.score_pyramid(k, cfg.levels, cfg.pooling_factor), want_kq, rtol=2e-6, atol=0)


@pytest.mark.parametrize("b,h,hkv,n,d,cfg", SHAPES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_select_kernel_gives_exactly_the_reference_indices(b, h, hkv, n, d, cfg, ties):
    q, k, _ = inputs(b, h, hkv, n, d, torch.float32)
    s_qk, s_kq = R.score(q, k, cfg.levels, cfg.pooling_factor)
    if ties:  # a handful of distinct values: the tie-break (earlier entry wins) decides most picks
        s_qk, s_kq = s_qk.round(), s_kq.round()
    want, want_inv = R.select(s_qk, s_kq, cfg.geometry(n))
    index, inv = kernels.select(s_qk, s_kq, cfg.geometry(n))
    assert torch.equal(index, want) and torch.equal(inv, want_inv)
    slots = torch.arange(want.shape[2], device=DEVICE, dtype=torch.int32).expand(want.shape)
    assert torch.equal(inv.gather(2, want), slots), "inv must map every selected entry to its slot"
    assert int((inv >= 0).sum()) == want.numel(), "inv must be -1 for every entry that was not selected"


@pytest.mark.parametrize("b,h,hkv,n,d,cfg", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_and_scatter_kernels_match_reference_forward_and_backward(b, h, hkv, n, d, cfg, dtype):
    levels, p = cfg.levels, cfg.pooling_factor
    q, k, _ = inputs(b, h, hkv, n, d, dtype)
    _, _, (index, inv) = scores_and_index(q, k, cfg)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    k64 = k.double()
    assert rel_err(kernels.gather(k, index, inv, levels, p), R.take(k64, R.pool(k64, levels, p), index)) < tol

    o = torch.randn(b, h, index.shape[2], d, device=DEVICE, dtype=dtype)
    assert rel_err(kernels.scatter(o, index, inv, n, levels, p), R.scatter(o.double(), index, inv, n, levels, p)) < tol

    grad = torch.randn(b, h, n, d, device=DEVICE, dtype=dtype)
    want = R.scatter_backward(grad.double(), index, inv, levels, p)
    assert rel_err(kernels.scatter_backward(grad, index, inv, levels, p), want) < tol

    pooled_len = R.level_offsets(n, levels, p)[-1] - n
    gx, gp = R.take_backward(o.double(), index, n, pooled_len, hkv)
    want = gx + R.pool_backward(gp, n, levels, p)
    assert rel_err(kernels.gather_backward(o, index, inv, n, hkv, levels, p), want) < tol


def float64_oracle(q, k, v, grad, cfg, index):
    """Output and q/k/v gradients of the operator in float64 on a given selection (selection exactness is
    tested on its own above); one batch element at a time, as float64 attention materialises S x S."""
    levels, p, n = cfg.levels, cfg.pooling_factor, q.shape[2]
    outs, grads = [], []
    for i in range(q.shape[0]):
        leaves = [t[i : i + 1].detach().double().requires_grad_() for t in (q, k, v)]
        idx = index[i : i + 1]
        qg, kg, vg = (R.take(t, R.pool(t, levels, p), idx) for t in leaves)
        out = R.scatter(F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), idx, None, n, levels, p)
        grads.append(torch.autograd.grad(out, leaves, grad[i : i + 1].double()))
        outs.append(out.detach())
    return torch.cat(outs), [torch.cat(g) for g in zip(*grads)]


@pytest.mark.parametrize("b,h,hkv,n,d,cfg", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_operator_on_kernels_matches_float64_oracle(b, h, hkv, n, d, cfg, dtype):
    q, k, v = (t.requires_grad_() for t in inputs(b, h, hkv, n, d, dtype))
    with use_stages(DEVICE, "kernels"):
        out = lighthouse_attention(q, k, v, cfg)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)

    index, _ = kernels.select(*kernels.score(q.detach(), k.detach(), cfg.levels, cfg.pooling_factor), cfg.geometry(n))
    want, want_grads = float64_oracle(q, k, v, grad, cfg, index)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, want) < tol
    for name, mine, ref in zip("qkv", grads, want_grads):
        assert rel_err(mine, ref) < tol, f"d{name}"


@contextlib.contextmanager
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@races_need_cuda
@pytest.mark.parametrize("b,h,hkv,n,d,cfg", SHAPES)
def test_operator_on_kernels_is_bit_identical_run_to_run(b, h, hkv, n, d, cfg):
    q, k, v = (t.requires_grad_() for t in inputs(b, h, hkv, n, d, torch.bfloat16))
    grad = torch.randn_like(q)

    def run():
        out = lighthouse_attention(q, k, v, cfg)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    # the Lighthouse kernels use no atomics and are deterministic in any mode; the stock inner attention
    # is only in deterministic mode (PyTorch then skips cuDNN, whose backward is not, for flash's)
    with deterministic_algorithms(), use_stages(DEVICE, "kernels"):
        first, second = run(), run()
    for name, a, c in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, c), f"{name} differs between two runs on the same inputs"


@races_need_cuda
@pytest.mark.parametrize("b,h,hkv,n,d,cfg", SHAPES)
def test_stage_kernels_are_bit_identical_run_to_run(b, h, hkv, n, d, cfg):
    levels, p = cfg.levels, cfg.pooling_factor
    q, k, _ = inputs(b, h, hkv, n, d, torch.bfloat16)
    o = torch.randn(b, h, cfg.gathered_len(n), d, device=DEVICE, dtype=q.dtype)

    def run():
        s_qk, s_kq = kernels.score(q, k, levels, p)
        index, inv = kernels.select(s_qk, s_kq, cfg.geometry(n))
        gathered = kernels.gather(k, index, inv, levels, p)
        return (s_qk, s_kq, index, inv, gathered, kernels.scatter(o, index, inv, n, levels, p),
                kernels.scatter_backward(q, index, inv, levels, p),
                kernels.gather_backward(o, index, inv, n, hkv, levels, p))

    for a, c in zip(run(), run()):
        assert torch.equal(a, c)


@needs_cuda
@pytest.mark.parametrize("n,topk", [(1 << 20, 8192), (1 << 19, 4096), (4096, 128)])
def test_long_sequences_and_large_budgets_run(n, topk):
    cfg = LighthouseConfig(topk=topk)
    q, k, v = (t.requires_grad_() for t in inputs(1, 2, 1, n, 64, torch.bfloat16))
    out = lighthouse_attention(q, k, v, cfg)
    out.sum().backward()
    assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))
    s_qk, s_kq, (want, _) = scores_and_index(q.detach(), k.detach(), cfg)
    index, _ = kernels.select(s_qk, s_kq, cfg.geometry(n))
    assert torch.equal(index, want)


@needs_cuda
def test_kernels_run_under_torch_compile():
    cfg = LighthouseConfig(topk=1024)
    q, k, v = (t.requires_grad_() for t in inputs(2, 4, 2, 16384, 128, torch.bfloat16))
    compiled = torch.compile(lambda a, b, c: lighthouse_attention(a, b, c, cfg), fullgraph=True)
    out = compiled(q, k, v)
    want = lighthouse_attention(q, k, v, cfg)
    assert torch.equal(out, want)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    for a, c in zip(grads, want_grads):
        assert rel_err(a, c) < 1e-3
