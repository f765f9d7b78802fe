"""The Lighthouse stages as torch.library custom ops, and the functional operator composed of them.

Custom ops (namespace ``lhcompile``) keep each stage one opaque, named node in traced graphs, with fake
kernels for Dynamo/AOTAutograd/export and autograd formulas; their implementations are the reference
stages in ``lhcompile.reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .config import LighthouseConfig


def _pooled_len(n: int, levels: int, p: int) -> int:
    return reference.level_offsets(n, levels, p)[-1] - n


# -- pool ------------------------------------------------------------------------------------------


@torch.library.custom_op("lhcompile::pool", mutates_args=())
def pool(x: Tensor, levels: int, p: int) -> Tensor:
    return reference.pool(x, levels, p)


@pool.register_fake
def _(x: Tensor, levels: int, p: int) -> Tensor:
    b, h, n, d = x.shape
    return x.new_empty(b, h, _pooled_len(n, levels, p), d)


def _pool_setup(ctx, inputs, output) -> None:
    x, ctx.levels, ctx.p = inputs
    ctx.n = x.shape[2]


def _pool_backward(ctx, grad):
    return reference.pool_backward(grad, ctx.n, ctx.levels, ctx.p), None, None


pool.register_autograd(_pool_backward, setup_context=_pool_setup)


# -- score (no gradient: the caller passes detached tensors) --------------------------------------


@torch.library.custom_op("lhcompile::score", mutates_args=())
def score(q: Tensor, k: Tensor, levels: int, p: int) -> tuple[Tensor, Tensor]:
    return reference.score(q, k, levels, p)


@score.register_fake
def _(q: Tensor, k: Tensor, levels: int, p: int) -> tuple[Tensor, Tensor]:
    total = reference.level_offsets(q.shape[2], levels, p)[-1]
    return (
        q.new_empty(q.shape[0], q.shape[1], total, dtype=torch.float32),
        k.new_empty(k.shape[0], k.shape[1], total, dtype=torch.float32),
    )


# -- select ----------------------------------------------------------------------------------------


@torch.library.custom_op("lhcompile::select", mutates_args=())
def select(s_qk: Tensor, s_kq: Tensor, n: int, levels: int, p: int, topk: int, tile_budget: int) -> Tensor:
    return reference.select(s_qk, s_kq, n, levels, p, topk, tile_budget)


@select.register_fake
def _(s_qk: Tensor, s_kq: Tensor, n: int, levels: int, p: int, topk: int, tile_budget: int) -> Tensor:
    if torch.compiler.is_exporting():
        # every Lighthouse subgraph has one select: exporting it would give an ONNX graph nobody can run
        raise RuntimeError(
            "lhcompile: this graph still contains Lighthouse attention (training only); call "
            "lhcompile.restore(model) before torch.export / torch.onnx.export to get the dense SDPA graph back"
        )
    s = n // p ** (levels - 1) + (levels - 1) * p * topk
    return s_qk.new_empty(s_qk.shape[0], s_qk.shape[1], s, dtype=torch.int64)


# -- gather ----------------------------------------------------------------------------------------


@torch.library.custom_op("lhcompile::gather", mutates_args=())
def gather(x: Tensor, pooled: Tensor, index: Tensor) -> Tensor:
    return reference.gather(x, pooled, index)


@gather.register_fake
def _(x: Tensor, pooled: Tensor, index: Tensor) -> Tensor:
    return x.new_empty(index.shape[0], index.shape[1], index.shape[2], x.shape[3])


def _gather_setup(ctx, inputs, output) -> None:
    x, pooled, index = inputs
    ctx.save_for_backward(index)
    ctx.n, ctx.pooled_len, ctx.kv_heads = x.shape[2], pooled.shape[2], x.shape[1]


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    grad_x, grad_pooled = reference.gather_backward(grad, index, ctx.n, ctx.pooled_len, ctx.kv_heads)
    return grad_x, grad_pooled, None


gather.register_autograd(_gather_backward, setup_context=_gather_setup)


# -- scatter ---------------------------------------------------------------------------------------


@torch.library.custom_op("lhcompile::scatter", mutates_args=())
def scatter(o: Tensor, index: Tensor, n: int, levels: int, p: int) -> Tensor:
    return reference.scatter(o, index, n, levels, p)


@scatter.register_fake
def _(o: Tensor, index: Tensor, n: int, levels: int, p: int) -> Tensor:
    return o.new_empty(o.shape[0], o.shape[1], n, o.shape[3])


def _scatter_setup(ctx, inputs, output) -> None:
    _, index, _, ctx.levels, ctx.p = inputs
    ctx.save_for_backward(index)


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return reference.scatter_backward(grad, index, ctx.levels, ctx.p), None, None, None, None


scatter.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# -- the operator ----------------------------------------------------------------------------------


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None, backend: str) -> Tensor:
    """Stock causal attention on the gathered sub-sequence (all tensors (B, H, S, d))."""
    if backend == "flash_attn":
        try:
            from flash_attn import flash_attn_func
        except ImportError as err:
            raise RuntimeError(
                "LighthouseConfig(inner_backend='flash_attn') but the flash_attn package is not importable; "
                "install flash-attn or use inner_backend='sdpa'"
            ) from err
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def lighthouse_stages(q: Tensor, k: Tensor, v: Tensor, *, n: int, scale: float | None, config: LighthouseConfig) -> Tensor:
    """The staged subgraph for a sequence of known length n (>= config.min_lighthouse_len).

    Shape arguments are plain ints so that the graph pass can trace this function into a graph.
    A length that does not split into whole tiles is zero-padded at the end; padded positions only
    ever reach outputs beyond n, which are cut off.
    """
    levels, p = config.levels, config.pooling_factor
    padded = config.padded_len(n)
    if padded != n:
        q, k, v = (F.pad(t, (0, 0, 0, padded - n)) for t in (q, k, v))
    s_qk, s_kq = score(q.detach(), k.detach(), levels, p)
    index = select(s_qk, s_kq, padded, levels, p, config.topk, config.tile_budget)
    qg = gather(q, pool(q, levels, p), index)
    kg = gather(k, pool(k, levels, p), index)
    vg = gather(v, pool(v, levels, p), index)
    out = scatter(dense_attention(qg, kg, vg, scale, config.inner_backend), index, padded, levels, p)
    if padded != n:
        out = out[:, :, :n]
    return out


def check_sdpa_inputs(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool) -> None:
    """Reject inputs the operator cannot compute exactly, saying what is wrong and what to do."""
    if not is_causal:
        raise ValueError(
            "lighthouse_attention is causal-only (is_causal=False was passed); use "
            "torch.nn.functional.scaled_dot_product_attention for non-causal or masked attention"
        )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected (B, H, N, d) tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ ({q.shape[3]} vs {k.shape[3]}); SDPA needs them equal")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k{tuple(k.shape)} and v{tuple(v.shape)} must agree in batch, heads and length")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q{tuple(q.shape)} and k{tuple(k.shape)} must share batch and sequence length "
            "(Lighthouse is self-attention over one sequence)"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def lighthouse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: LighthouseConfig | None = None,
    *,
    is_causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    """Lighthouse attention with SDPA's signature and layout: (B, H, N, d) in, (B, H, N, d_v) out.

    k and v may have fewer heads than q (GQA, as SDPA's enable_gqa). Sequences shorter than
    ``config.min_lighthouse_len`` run dense causal SDPA instead.
    """
    config = config or LighthouseConfig()
    check_sdpa_inputs(q, k, v, is_causal=is_causal)
    n = q.shape[2]
    if n < config.min_lighthouse_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return lighthouse_stages(q, k, v, n=n, scale=scale, config=config)
