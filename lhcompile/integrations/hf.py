"""lhcompile in Hugging Face transformers: ``attn_implementation="causal_sdpa"`` and the Trainer callback.

Importing this module registers ``causal_sdpa``. It computes what ``"sdpa"`` computes without the N x N mask:

- a plainly causal call (the module is causal, so never an encoder or a cross-attention; no padding mask, no
  sliding or chunked window shorter than the keys, as many queries as keys, no position bias) gets SDPA with
  is_causal=True;
- packed documents (``position_ids`` that start anew, as ``DataCollatorWithFlattening`` makes them) are kept
  apart with ``lhcompile.document_attention``, in every mode: eager, compiled, applied (Lighthouse per document)
  and restored. A document begins where the positions do not increase (a restart at 0 or 1, as "sdpa" splits
  them); positions that jump forward (context-parallel shards carry global positions) stay one document, where
  "sdpa" would cut them.
  FlashAttention's boundaries, where the model is handed them (``cu_seq_lens_q``, from
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), say where documents begin, as for
  ``"flash_attention_2"``: with ``return_position_ids=False`` "sdpa" would attend across documents;
- every other call (padding, sliding windows, decoding with a cache, overlays such as Gemma 3's bidirectional
  image blocks) goes to transformers' own sdpa path with the mask transformers builds for it.

Why a mask-free call matters: transformers 5.x under torch.compile builds an explicit N x N mask otherwise (from
``position_ids``, which it cannot look at while compiling), and no pass can prove a mask made from inputs causal:
dense layers would keep N^2 memory and SDPA off its flash and cuDNN kernels, and layers compiled on their own
(per-layer FSDP2, context parallelism) would stay dense. Under torch.compile transformers wraps every causal mask
in its packed-sequence functions; their closures are hidden from Dynamo, so an overlay inside such a wrapper
cannot be read there: transformers' ``blockwise_overlay`` (Gemma 3's image tokens) is therefore noted as it is
built, and the mask request that follows gets the full mask. Call the model without ``attention_mask`` when every
token is real: a mask of ones is data, and under torch.compile transformers builds the full mask from it.

``LighthouseCallback`` runs the two-stage recipe inside ``Trainer.train()``::

    trainer = Trainer(model, args, train_dataset=...,
                      callbacks=[LighthouseCallback(LighthouseConfig(topk=1536), recovery_start=0.7)])
    trainer.train()
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, TrainerCallback, masking_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import and_masks, causal_mask_function, or_masks, sdpa_mask

import lhcompile

from ..config import LighthouseConfig
from ..operator.documents import Documents, document_attention
from ..report import Report


class _Overlays:
    """Block overlays transformers has built whose mask it has not asked for yet. Under torch.compile the closures
    of its mask functions are hidden from Dynamo, so an overlay inside the packed-sequence ``and_masks`` (Gemma 3's
    ``or_masks(causal, blockwise_overlay)``) is noted as it is built, and the mask request that follows it (in the
    same ``create_causal_mask``) reads the note. Both run while Dynamo traces (assume_constant_result), so the
    note decides the graph being traced, as an overlay's presence does (transformers builds it when
    ``token_type_ids`` is given)."""

    pending = False


@torch._dynamo.assume_constant_result
def _note_overlay() -> bool:
    _Overlays.pending = True
    return True


@torch._dynamo.assume_constant_result
def _take_overlay_note() -> bool:
    pending, _Overlays.pending = _Overlays.pending, False
    return pending


if hasattr(masking_utils, "blockwise_overlay"):  # transformers >= 5.2x builds overlays inside create_causal_mask
    _blockwise_overlay = masking_utils.blockwise_overlay

    def _noted_blockwise_overlay(block_sequence_ids: torch.Tensor) -> Callable:
        _note_overlay()
        return _blockwise_overlay(block_sequence_ids)

    masking_utils.blockwise_overlay = _noted_blockwise_overlay


def _inner_code(factory: Any, name: str) -> Any:
    return next(c for c in factory.__code__.co_consts if getattr(c, "co_name", None) == name)


_AND = _inner_code(and_masks, "and_mask")
_OR = _inner_code(or_masks, "or_mask")
_PACKED = _inner_code(masking_utils.packed_sequence_mask_function, "inner_mask")
_REMAP = (_inner_code(masking_utils.remap_positions_for_packed_sequence, "inner_mask")
          if hasattr(masking_utils, "remap_positions_for_packed_sequence") else None)  # transformers >= 5.2x
_PACKING_CODES = {causal_mask_function.__code__, _AND, _PACKED, _REMAP} - {None}


def _causal_up_to_packing_eager(fn: Any) -> bool:
    """Eagerly, where closures can be read: whether fn is the causal mask, possibly and-ed with packed-sequence
    masks and its positions remapped per document, and nothing else (no or_masks overlay, no other mask)."""
    code = getattr(fn, "__code__", None)
    if fn is causal_mask_function or code is _PACKED:
        return True
    if code not in (_AND, _REMAP):
        return False
    inner = [cell.cell_contents for cell in fn.__closure__ or ()]
    functions = [f for c in inner for f in (c if isinstance(c, tuple) else (c,)) if callable(f)]
    return bool(functions) and all(_causal_up_to_packing_eager(f) for f in functions)


def _causal_up_to_packing(fn: Any, request: dict[str, Any]) -> bool:
    """Whether a mask request is the causal one, possibly wrapped in the packed-sequence functions that transformers
    adds where position_ids restart. A causal request never carries allow_is_bidirectional_skip; custom overlays
    passed as or/and_mask_function set use_vmap. Under torch.compile only the outer function's code is visible (an
    overlay inside it was noted as it was built: see ``_Overlays``)."""
    if request.get("use_vmap") or "allow_is_bidirectional_skip" in request:
        return False
    if not torch.compiler.is_compiling():
        return _causal_up_to_packing_eager(fn)
    return getattr(fn, "__code__", None) in _PACKING_CODES


def _query_length(kwargs: dict[str, Any]) -> int | None:
    if "q_length" in kwargs:
        return kwargs["q_length"]
    cache_position = kwargs.get("cache_position")  # transformers versions that pass positions instead
    return None if cache_position is None else cache_position.shape[0]


def _plainly_causal(kwargs: dict[str, Any]) -> bool:
    """Whether a mask request is the lower triangle over as many queries as keys within each packed document
    (documents are then kept apart by the attention function, from position_ids)."""
    kv_length, window = kwargs.get("kv_length"), kwargs.get("local_size")
    function = kwargs.get("mask_function", causal_mask_function)
    overlay = _take_overlay_note()
    return (
        not overlay
        and kwargs.get("attention_mask") is None
        and (function is causal_mask_function or _causal_up_to_packing(function, kwargs))
        and kv_length is not None and _query_length(kwargs) == kv_length and not kwargs.get("kv_offset")
        and (window is None or window >= kv_length)
    )


class PackedDocuments:
    """What ``causal_sdpa_mask`` gives for a plainly causal request that transformers wrapped in its packed-sequence
    functions: the attention function keeps the documents of ``position_ids`` apart. Transformers wraps every
    request under torch.compile (it cannot read ``position_ids`` there) and, eagerly, only where the positions jump;
    so a model whose own call runs eagerly around layers compiled on their own (``apply(regional=True)``, per-layer
    FSDP2) hands each layer ``None`` for a batch of one document per row, and its layers are plain causal attention
    (plain Lighthouse), not Lighthouse per document on documents that turn out to be one. A layer compiled with
    one is guarded on the other's type: a packed batch later compiles its own graph, per document."""

    def __repr__(self) -> str:
        return "PackedDocuments(documents from position_ids)"


def causal_sdpa_mask(*args: Any, **kwargs: Any):
    """No mask where the request is plainly causal (``PackedDocuments`` where transformers says the positions may
    be packed); transformers' sdpa mask otherwise."""
    if not args and _plainly_causal(kwargs):
        return None if kwargs.get("mask_function", causal_mask_function) is causal_mask_function else PackedDocuments()
    return sdpa_mask(*args, **kwargs)


def _packed(position_ids: torch.Tensor | None) -> bool:
    """Whether position ids may restart inside a row: always under torch.compile (values are not known while
    tracing), from their values eagerly."""
    if position_ids is None:
        return False
    return torch.compiler.is_compiling() or bool((position_ids[..., 1:] <= position_ids[..., :-1]).any())


def _documents(module, query: torch.Tensor, packed: bool, kwargs: dict[str, Any]) -> Documents | None:
    """The packed documents of a plainly causal call: FlashAttention's boundaries where the model was handed them
    (``cu_seq_lens_q``, from ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), as
    ``"flash_attention_2"`` keeps them; else position ids that restart, where transformers said they may; None: one
    sequence per row."""
    b, n = query.shape[0], query.shape[2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None:
        if cu_k is not None and cu_k is not cu_q and not torch.compiler.is_compiling() and not torch.equal(cu_q, cu_k):
            raise ValueError(f"attn_implementation='causal_sdpa': {type(module).__name__} (layer "
                             f"{getattr(module, 'layer_idx', '?')}) got cu_seq_lens_q={cu_q.tolist()} and "
                             f"cu_seq_lens_k={cu_k.tolist()}; packed self-attention has one set of document boundaries")
        return Documents.from_cu_seqlens(cu_q, n, b)
    position_ids = kwargs.get("position_ids")
    if packed and _packed(position_ids):
        return Documents.from_positions(position_ids.expand(b, n))
    return None


def causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    packed = isinstance(attention_mask, PackedDocuments)
    if packed:
        attention_mask = None
    if attention_mask is not None or query.shape[2] != key.shape[2] or not is_causal \
            or kwargs.get("position_bias") is not None:
        # a real mask (padding, window, overlay), decoding with a cache, an encoder's or a cross-attention's module
        # (is_causal False), a position bias: transformers' own sdpa path, exactly as "sdpa"
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
    documents = _documents(module, query, packed, kwargs)
    if documents is not None:
        if dropout:
            raise ValueError(f"attn_implementation='causal_sdpa': {type(module).__name__} has attention dropout "
                             f"{dropout}, which lhcompile.document_attention (packed documents) does not compute; "
                             "use attn_implementation='sdpa' or set attention_dropout=0")
        out = document_attention(query, key, value, documents, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, dropout_p=dropout,
                                             enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("causal_sdpa", causal_sdpa)
AttentionMaskInterface.register("causal_sdpa", causal_sdpa_mask)


class LighthouseCallback(TrainerCallback):
    """Lighthouse attention for the first ``recovery_start`` of the training steps, dense after that.

    At the start of training the callback applies the Lighthouse pass to the model; at ``recovery_start`` of the
    run's steps it restores the dense model, which trains on with the same optimizer and scheduler state (the
    Trainer keeps both; only the attention changes). Evaluation always runs dense (eval mode). Gradient
    checkpointing (``gradient_checkpointing=True``) and ``torch_compile=True`` work. At the end of training the
    model is dense again, so what the Trainer saves is the untouched model. ``report`` keeps what the pass found
    and did, as it stood when the model went dense (``lhcompile.inspect`` on the restored model is empty).

    ``compiler`` defaults to the Trainer's ``torch_compile_backend`` when ``torch_compile`` is on, else "eager"
    (the rewritten graph runs op by op; pass "inductor" to compile it anyway).
    """

    def __init__(self, config: LighthouseConfig | None = None, *, recovery_start: float = 0.7,
                 filter_fn: Callable[[str], bool] | None = None, compiler: str | None = None) -> None:
        if not 0.0 <= recovery_start <= 1.0:
            raise ValueError(f"LighthouseCallback: recovery_start={recovery_start!r} must be a share of the steps, "
                             "between 0 and 1")
        self.config = config or LighthouseConfig()
        self.recovery_start = recovery_start
        self.filter_fn = filter_fn
        self.compiler = compiler
        self.switch_step: int | None = None
        """The global step at which the model goes dense (known once training starts)."""
        self.switched_at: int | None = None
        """The global step at which it did."""
        self.report: Report | None = None
        """What the pass found and did, as it stood at the switch."""
        self._model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.switch_step = round(self.recovery_start * state.max_steps)
        if state.global_step >= self.switch_step:  # resumed past the switch: the dense stage goes on
            return
        compiler = self.compiler or ((args.torch_compile_backend or "inductor") if args.torch_compile else "eager")
        lhcompile.apply(model, self.config, compiler=compiler, filter_fn=self.filter_fn)
        self._model = model

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._model is not None and state.global_step >= self.switch_step:
            self._restore()
            self.switched_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self._model is not None:
            self._restore()

    def _restore(self) -> None:
        self.report = lhcompile.inspect(self._model)
        lhcompile.restore(self._model)
        self._model = None
