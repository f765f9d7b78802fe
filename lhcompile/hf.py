"""Hugging Face transformers integration: attn_implementation="causal_sdpa" (import this module to register it).

It calls SDPA with is_causal=True and no mask. transformers 5.x under torch.compile with torch < 2.14 builds an
explicit N x N causal mask (its masking_utils says so), and builds it from ``position_ids`` when they are
passed. lhcompile proves an in-graph causal mask causal and drops it at Lighthouse sites, but:
- dense layers and the dense stage keep the mask: N^2 memory, and SDPA off the cuDNN and flash kernels;
- under context parallelism each rank passes global ``position_ids`` of its two chunks, from which
  transformers would build a wrong (packed-sequence) mask that depends on inputs, so it cannot be dropped;
- with per-layer FSDP2 each layer is compiled on its own and the mask, made outside the layer, is an input of
  the layer's graph, which no pass can prove causal.
``LlamaConfig(..., attn_implementation="causal_sdpa")`` avoids both; the weights and checkpoints are the
same as with "sdpa" (the choice is not saved in config.json).
"""

from __future__ import annotations

import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface


def causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("causal_sdpa", causal_sdpa)
AttentionMaskInterface.register("causal_sdpa", lambda *args, **kwargs: None)
