"""Hugging Face transformers integration: attn_implementation="causal_sdpa" (import this module to register it).

It computes what "sdpa" computes, without the N x N mask where a call is plainly causal self-attention: the
module is causal (its ``is_causal``; encoders and cross-attention are not), no padding mask, no sliding (or
chunked) window shorter than the keys, as many queries as keys, no position bias. Those calls get SDPA with
is_causal=True and no mask; every other call goes to transformers' own sdpa path with the mask transformers
builds for it. Why a mask-free causal call matters: transformers 5.x under torch.compile with torch < 2.14
builds an explicit N x N causal mask otherwise. lhcompile proves an in-graph causal mask causal and drops it at
Lighthouse sites, but:
- dense layers and the dense stage would keep the mask: N^2 memory, and SDPA off the cuDNN and flash kernels;
- under context parallelism each rank passes global ``position_ids`` of its two chunks, from which transformers
  would build a (packed-sequence) mask that depends on inputs;
- with per-layer FSDP2 or per-layer compilation each layer is compiled on its own and the mask, made outside
  the layer, is an input of the layer's graph, which no pass can prove causal.

One difference from "sdpa", under torch.compile only (``COMPILED_NOTE``): transformers cannot look at the
values of ``position_ids`` while compiling, so it wraps every mask in a packed-sequence check; causal_sdpa then
takes ``position_ids`` as the positions of one sequence (plain causal attention, as the Lighthouse paper
trained), so documents packed with restarting position_ids attend across their boundaries. That is a guess, so
it is said: a LighthouseWarning, once per process, the first time a compiled model runs such a call (with
``lhcompile.apply`` or plain ``torch.compile`` alike). Run eagerly, it sees real packing and hands those calls
to the sdpa path. The weights and checkpoints are the same as with "sdpa"
(the choice is not saved in config.json). Call the model without ``attention_mask`` when every token is real: a
mask of ones is data, and under torch.compile transformers builds the full mask from it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, masking_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask

from .report import LighthouseWarning


def _query_length(kwargs: dict[str, Any]) -> int | None:
    if "q_length" in kwargs:
        return kwargs["q_length"]
    cache_position = kwargs.get("cache_position")  # transformers versions that pass positions instead
    return None if cache_position is None else cache_position.shape[0]


COMPILED_NOTE = (
    "attn_implementation='causal_sdpa' under torch.compile takes position_ids as the positions of one sequence: "
    "documents packed with restarting position_ids attend across their boundaries (plain causal attention, as the "
    "Lighthouse paper trained), where 'sdpa' would mask them apart; padding masks and sliding windows are kept "
    "exactly. Use attn_implementation='sdpa' if you pack documents and need them apart"
)


_noted = False


@torch._dynamo.assume_constant_result  # Dynamo runs it while tracing instead of breaking the graph on the warning
def _note_packing_assumed() -> bool:
    global _noted
    if not _noted:
        _noted = True
        warnings.warn(f"lhcompile: {COMPILED_NOTE}", LighthouseWarning, stacklevel=2)
    return True


def _inner_code(factory: Any, name: str) -> Any:
    return next(c for c in factory.__code__.co_consts if getattr(c, "co_name", None) == name)


_PACKING_CODES = {causal_mask_function.__code__, _inner_code(and_masks, "and_mask")}
if hasattr(masking_utils, "remap_positions_for_packed_sequence"):  # transformers >= 5.2x remaps packed positions
    _PACKING_CODES.add(_inner_code(masking_utils.remap_positions_for_packed_sequence, "inner_mask"))


def _causal_up_to_packing(fn: Any, request: dict[str, Any]) -> bool:
    """Under torch.compile: whether a mask request is the causal one, possibly wrapped in the packed-sequence
    functions that transformers adds where it cannot look at position_ids. Dynamo shows a mask function's code
    but not what its closure holds, so a causal request (never a bidirectional one, which carries
    allow_is_bidirectional_skip) without custom overlays (they set use_vmap) made of and_masks and position
    remapping is taken as such; windows are checked on local_size by the caller."""
    return (getattr(fn, "__code__", None) in _PACKING_CODES and not request.get("use_vmap")
            and "allow_is_bidirectional_skip" not in request)


def _plainly_causal(kwargs: dict[str, Any]) -> bool:
    """Whether a mask request is the lower triangle over as many queries as keys, and nothing else (under
    torch.compile, whatever packed-sequence wrapper transformers had to add without seeing position_ids)."""
    kv_length, window = kwargs.get("kv_length"), kwargs.get("local_size")
    function = kwargs.get("mask_function", causal_mask_function)
    plain = function is causal_mask_function
    causal = (
        kwargs.get("attention_mask") is None
        and (plain or (torch.compiler.is_compiling() and _causal_up_to_packing(function, kwargs)))
        and kv_length is not None and _query_length(kwargs) == kv_length and not kwargs.get("kv_offset")
        and (window is None or window >= kv_length)
    )
    if causal and not plain:
        _note_packing_assumed()
    return causal


def causal_sdpa_mask(*args: Any, **kwargs: Any):
    """No mask where the request is plainly causal; transformers' sdpa mask otherwise."""
    if not args and _plainly_causal(kwargs):
        return None
    return sdpa_mask(*args, **kwargs)


def causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is not None or query.shape[2] != key.shape[2] or not is_causal \
            or kwargs.get("position_bias") is not None:
        # a real mask (padding, window, packing), decoding with a cache, an encoder's or a cross-attention's
        # module (is_causal False), a position bias: transformers' own sdpa path, exactly as "sdpa"
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    window = kwargs.get("sliding_window")
    if window is not None and window < key.shape[2]:
        # only reachable when a model passes a window without asking the mask interface for its mask
        raise ValueError(
            f"attn_implementation='causal_sdpa': {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) "
            f"has sliding_window={window} < {key.shape[2]} keys but no mask was built for it; plain causal attention "
            "would ignore the window. Use attn_implementation='sdpa' for this model"
        )
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, dropout_p=dropout,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("causal_sdpa", causal_sdpa)
AttentionMaskInterface.register("causal_sdpa", causal_sdpa_mask)
