"""The operator users call directly: ``lighthouse_attention``, with SDPA's signature, over one sequence per row or
over packed documents."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import LighthouseConfig
from .autocast import autocast_like_sdpa
from .documents import Documents, dense_documents, lighthouse_documents
from .lighthouse import lighthouse_stages
from .rotary import Rotary


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
    rope: Rotary | None = None,
    documents: Documents | None = None,
) -> Tensor:
    """Lighthouse attention with SDPA's signature and layout: what the pass puts in place of a causal SDPA call.

    k and v may have fewer heads than q (GQA, as SDPA's ``enable_gqa``); in an autocast region they run in its
    dtype, as SDPA's do. Sequences shorter than ``config.min_lighthouse_len`` run dense causal SDPA instead.

    Args:
        q: (B, H, N, d) queries (rotated, unless ``rope`` is given).
        k: (B, H_kv, N, d) keys, H a multiple of H_kv.
        v: (B, H_kv, N, d_v) values.
        config: what Lighthouse computes (default ``LighthouseConfig()``).
        is_causal: must be True (Lighthouse is causal).
        scale: the softmax scale (default 1 / sqrt(d)).
        rope: the model's rotation tables (``Rotary.of``): q and k are then taken unrotated and each gathered entry
            is rotated at the last position it covers, whatever ``config.rope`` says (``config.rope=
            'after_selection'`` without tables is refused: there would be none to rotate with).
        documents: the rows are packed documents (``Documents``), kept apart: each document of at least
            ``config.min_lighthouse_len`` tokens gets Lighthouse as if it were the whole sequence, each shorter one
            dense causal attention within it; ``rope``'s tables are then by packed token, positions starting anew
            with each document. The documents are data: changing them changes no shape (no recompilation).

    Returns:
        (B, H, N, d_v), in SDPA's layout.

    Example::

        config = LighthouseConfig(levels=2, pooling_factor=2, topk=64, tile_budget=16)
        q, k, v = (torch.randn(1, 8, 4096, 64) for _ in range(3))
        out = lighthouse_attention(q, k, v, config)   # N >= config.min_lighthouse_len = 128: Lighthouse
    """
    config = config or LighthouseConfig()
    q, k, v = autocast_like_sdpa(q, k, v)
    check_sdpa_inputs(q, k, v, is_causal=is_causal)
    Rotary.check_for(rope, config.rope, q, "lighthouse_attention")
    b, n = q.shape[0], q.shape[2]
    if documents is not None:
        documents.check(q, "lighthouse_attention")
        scale = q.shape[3] ** -0.5 if scale is None else scale
        if n >= config.min_lighthouse_len:
            return lighthouse_documents(q, k, v, documents.starts, batch=b, length=n, scale=scale, config=config,
                                        rotary=rope)
        return dense_documents(q, k, v, documents.starts, batch=b, length=n, scale=scale, rotary=rope)
    if n < config.min_lighthouse_len:
        if rope is not None:
            q, k = rope.rotate(torch.arange(n, device=q.device).expand(b, 1, n), q, k)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return lighthouse_stages(q, k, v, n=n, scale=scale, config=config, rotary=rope)
