"""``document_attention`` document by document: the reference kernel where its GPU kernels do not run (on a CPU,
in full precision), holding each document's score matrix (for tests and modest lengths)."""

from __future__ import annotations

import torch
from torch import Tensor

from .forms import Segments


def grouped(x: Tensor, heads: int) -> Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def lse_dtype(q: Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def _wide(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _causal_probabilities(q: Tensor, k: Tensor, scale: float, lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax of one document's causal scores (and its log-sum-exp), in fp32 at least."""
    n = q.shape[2]
    scores = (_wide(q) @ _wide(grouped(k, q.shape[1])).transpose(-1, -2) * scale).masked_fill(
        ~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse = torch.logsumexp(scores, -1) if lse is None else lse
    return (scores - lse[..., None]).exp(), lse


def _documents(segments: Segments, n: int) -> list[tuple[int, slice]]:
    """Each document computed, in rows of n tokens: its row and its tokens."""
    return [(first // n, slice(first % n, first % n + size)) for first, size in zip(segments.firsts, segments.lengths)]


def _one_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention of one document (1, H, n, d), k and v with all of q's heads: output and log-sum-exp."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)[:2]
    p, lse = _causal_probabilities(q, k, scale)
    return (p @ _wide(v)).to(q.dtype), lse


def _one_backward(g: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, o, lse, 0.0, True, scale=scale)
    p, _ = _causal_probabilities(q, k, scale, _wide(lse))
    g, o = _wide(g), _wide(o)
    ds = p * (g @ _wide(v).transpose(-1, -2) - (g * o).sum(-1, keepdim=True))
    return ((ds @ _wide(k) * scale).to(q.dtype), (ds.transpose(-1, -2) @ _wide(q) * scale).to(k.dtype),
            (p.transpose(-1, -2) @ g).to(v.dtype))


def reference_forward(q, k, v, segments, scale):
    h = q.shape[1]
    out = q.new_zeros(*q.shape[:3], v.shape[3])
    lse = q.new_full(q.shape[:3], float("-inf"), dtype=lse_dtype(q))
    for b, t in _documents(segments, q.shape[2]):
        o, m = _one_forward(*(x[b : b + 1, :, t].contiguous() for x in (q, grouped(k, h), grouped(v, h))), scale)
        out[b, :, t], lse[b, :, t] = o[0], m[0].to(lse.dtype)
    return out, lse


def reference_backward(grad, q, k, v, out, lse, segments, scale):
    h, group = q.shape[1], q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def ungroup(x: Tensor) -> Tensor:
        return x if group == 1 else x.view(x.shape[0], -1, group, *x.shape[2:]).sum(2)

    for b, t in _documents(segments, q.shape[2]):
        part = [x[b : b + 1, :, t].contiguous() for x in (grad, q, grouped(k, h), grouped(v, h), out)]
        m = lse[b : b + 1, :, t].contiguous()
        if q.device.type == "cpu":
            m = m.to(torch.promote_types(q.dtype, torch.float32))
        gq, gk, gv = _one_backward(*part, m, scale)
        dq[b, :, t], dk[b, :, t], dv[b, :, t] = gq[0], ungroup(gk)[0].to(k.dtype), ungroup(gv)[0].to(v.dtype)
    return dq, dk, dv

