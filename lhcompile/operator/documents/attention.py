"""``document_attention``: dense causal attention within each packed document, as one op (``lhcompile::
document_attention``) that reads the documents on the host once per forward (its backward reuses that copy), runs
in an autocast region as SDPA would, and exports (torch.export, ONNX) as SDPA with the documents' causal mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..autocast import autocast_like_sdpa
from .forms import Documents, Segments, host_flags
from .planner import gpu_backward, gpu_forward
from .reference import grouped, lse_dtype, reference_backward, reference_forward


def _token_major(b: int, h: int, n: int, d: int, like: Tensor) -> Tensor:
    """An empty (B, H, N, d) tensor laid out as (B, N, H, d), as a model's projections give q, k and v."""
    return like.new_empty(b, n, h, d).transpose(1, 2)


def _laid_out_as(t: Tensor, like: Tensor) -> Tensor:
    """t with the layout of ``like`` (what the op's fake promises the compiler), copied only if it differs. A stride
    of a dimension of size 1 is no layout (the compiler's stride checks skip it), and a compiled graph's views of a
    model's (N, H, d) rows carry a batch stride of H * d: comparing it would copy every gradient of a batch of one
    row."""
    same = all(a == b for a, b, size in zip(t.stride(), like.stride(), t.shape) if size > 1)
    return t if same else like.copy_(t)


@torch.library.custom_op("lhcompile::document_attention", mutates_args=())
def _document_attention(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, keep: Tensor | None, scale: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    _check_dtypes(q, k, v)
    flags = host_flags(starts, keep)
    out, lse = _implementation(q)[0](q, k, v, Segments.read(flags), scale)
    return _laid_out_as(out, _token_major(*q.shape[:3], v.shape[3], q)), lse.contiguous(), flags


@_document_attention.register_fake
def _(q, k, v, starts, keep, scale):
    _check_dtypes(q, k, v)
    return (_token_major(*q.shape[:3], v.shape[3], q), q.new_empty(q.shape[:3], dtype=lse_dtype(q)),
            torch.empty(1 if keep is None else 2, *starts.shape, dtype=torch.bool, device="cpu"))


@torch.library.custom_op("lhcompile::document_attention_backward", mutates_args=())
def _document_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 flags: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    grads = _implementation(q)[1](grad, q, k, v, out, lse, Segments.read(flags), scale)
    return tuple(_laid_out_as(g, torch.empty_like(x)) for g, x in zip(grads, (q, k, v)))


@_document_attention_backward.register_fake
def _(grad, q, k, v, out, lse, flags, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output) -> None:
    q, k, v, starts, keep, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, grad, _grad_lse, _grad_flags):
    # the forward's host copy of the documents: the backward reads them without waiting for the GPU
    q, k, v, out, lse, flags = ctx.saved_tensors
    # token-major as q, k and v are where a model hands them (a plain copy would be one, and _token_rows another)
    grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    return *_document_attention_backward(grad, q, k, v, out, lse, flags, ctx.scale), None, None, None


_document_attention.register_autograd(_backward, setup_context=_setup)


def _check_dtypes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"document_attention: q, k and v must have one dtype (as for SDPA), got {q.dtype}, "
                         f"{k.dtype} and {v.dtype}; cast them, or call it under torch.autocast")



_LIBRARY = torch.library.Library("lhcompile", "FRAGMENT")


def _register_autocast(device_type: str, dispatch_key: str) -> None:
    """In an autocast region the op runs in the region's lower-precision dtype, as the SDPA call it stands for would
    (SDPA is on autocast's list, a custom op is not; a model with fp32 master weights rotates q and k into fp32
    beside a bf16 v). A dispatch rule, so that it holds eagerly, compiled and in the graphs the pass rewrites alike;
    written here since ``torch.library.register_autocast`` fixes one dtype for every region."""

    def kernel(q, k, v, starts, keep, scale):
        q, k, v = autocast_like_sdpa(q, k, v)
        with torch.autocast(device_type, enabled=False):
            return _document_attention(q, k, v, starts, keep, scale)

    _LIBRARY.impl("document_attention", kernel, dispatch_key)


_register_autocast("cpu", "AutocastCPU")
_register_autocast("cuda", "AutocastCUDA")


def document_attention(q: Tensor, k: Tensor, v: Tensor, documents: Documents, *, scale: float | None = None,
                       keep: Tensor | None = None) -> Tensor:
    """Dense causal attention within each document of a packed batch, in SDPA's layout.

    On CUDA in bf16/fp16 the documents are read on the host once per forward (the backward reuses that copy) and
    split into kernel calls (``planner.PLANNER``): cuDNN's attention for documents of one padded width together,
    flash varlen for the rest; elsewhere (a CPU, fp32) a reference, document by document, that holds each
    document's score matrix (for tests and modest lengths). In an autocast region it runs in the region's dtype,
    as SDPA does; under torch.export it is SDPA with the documents' causal mask.

    Args:
        q: (B, H, N, d) queries.
        k: (B, H_kv, N, d) keys, H a multiple of H_kv (GQA).
        v: (B, H_kv, N, d_v) values.
        documents: where the documents begin (``Documents``).
        scale: the softmax scale (default 1 / sqrt(d)).
        keep: (B, N) bool, the same for every token of a document: documents left out (their outputs are 0 and cost
            nothing on a GPU).

    Returns:
        (B, H, N, d_v): each token's attention over its own document's tokens up to itself.

    Example::

        documents = Documents.from_positions(position_ids)        # (B, N), restarting with each document
        out = document_attention(q, k, v, documents)
    """
    documents.check(q, "document_attention")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"document_attention: query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]})")
    scale = q.shape[3] ** -0.5 if scale is None else scale
    if torch.compiler.is_exporting():
        return _exported(q, k, v, documents.starts, keep, scale)
    return _document_attention(q, k, v, documents.starts, keep, scale)[0]


def _exported(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, keep: Tensor | None, scale: float) -> Tensor:
    """``document_attention`` for torch.export and ONNX: SDPA with the documents' causal mask, made of standard
    ops (an exported program runs where lhcompile is not installed; inference, where an N x N mask is fine)."""
    n = q.shape[2]
    document = (starts | (torch.arange(n, device=starts.device) == 0)).long().cumsum(1)
    mask = (document[:, None, :, None] == document[:, None, None, :]) & torch.ones(
        n, n, dtype=torch.bool, device=q.device).tril()
    k, v = grouped(k, q.shape[1]), grouped(v, q.shape[1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out if keep is None else out * keep[:, None, :, None]


def runs_kernels(device: torch.device | None, dtype: torch.dtype | None) -> bool:
    """Whether ``document_attention`` runs its GPU kernels (cuDNN batches, flash varlen) on tensors of this device
    and dtype; elsewhere, and in full precision, it runs a reference document by document."""
    return getattr(device, "type", None) == "cuda" and dtype in (torch.bfloat16, torch.float16)


def _implementation(q: Tensor):
    fast = runs_kernels(q.device, q.dtype)
    return (gpu_forward, gpu_backward) if fast else (reference_forward, reference_backward)

