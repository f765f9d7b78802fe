"""Packed documents: where they begin, dense attention within each, and Lighthouse per document.

A packed batch (B, N) holds documents one after another; ``Documents`` says where each begins. Lighthouse per
document (``lighthouse_documents``) computes, for every document of at least ``config.min_lighthouse_len``
tokens, what ``lighthouse_attention`` computes on that document alone (its own pyramid, tiles and scatter), and
for every shorter one dense causal attention within it; nothing crosses a boundary. Document lengths are data,
not shapes: every tensor here has a size fixed by (B, N) and the configuration, so a compiled graph serves every
mix of documents. How:

- ``Layout`` (a few integer ops over the tokens, once per batch) relays the long documents into one stream,
  batch rows one after another: each starts on a coarsest-block boundary, is zero-padded to whole tiles as the
  single-sequence operator pads, and is followed by one empty coarsest block, so that no pooled entry spans two
  documents and the causal shift of a document's last entries lands in its own gap. The unchanged score, gather
  and scatter stages run on that stream; ``select_documents`` runs each document's tiles on their own.
- The gathered entries of all long documents and the tokens of all short ones go through ``document_attention``
  (dense causal attention within each document: on a GPU one flash varlen call for documents shorter than
  ``CUDNN_MIN_LENGTH`` and cuDNN for each longer one, padded to a width on a fixed grid; a reference document by
  document elsewhere), one call each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import ops
from .config import LighthouseConfig
from .rotary import Rotary, entry_positions


@dataclass(frozen=True)
class Documents:
    """Where the documents of a packed batch begin: ``starts`` (B, N) bool, True at each document's first token.

    Every row begins a document; a document never spans two rows. Build it from what the data pipeline has:
    ``from_cu_seqlens`` (varlen's cumulative lengths over the batch's rows laid end to end), ``from_ids`` (a
    document id per token; a document is a run of equal ids) or ``from_positions`` (position ids that start anew
    with each document, as torchtitan and Hugging Face's DataCollatorWithFlattening make them). The constructors
    check their argument's values (one host sync), except while torch.compile traces them."""

    starts: Tensor

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor, length: int, batch: int = 1) -> Documents:
        """From cumulative lengths (D+1,) over ``batch`` rows of ``length`` tokens laid end to end."""
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError(f"Documents.from_cu_seqlens: cu_seqlens must be a 1-D integer tensor, got "
                             f"{_describe(cu_seqlens)}")
        total = batch * length
        if not torch.compiler.is_compiling():
            values = cu_seqlens.tolist()
            rule = ("must start at 0" if not values or values[0] != 0 else
                    f"must end at batch * length = {total}" if values[-1] != total else
                    "must not decrease" if any(a > b for a, b in zip(values, values[1:])) else
                    f"must hold every row's start (multiples of length={length}): a document cannot span two rows"
                    if not set(range(0, total, length)) <= set(values) else None)
            if rule:
                raise ValueError(f"Documents.from_cu_seqlens: cu_seqlens={_short(values)} {rule}")
        return cls(starts_of("cu_seqlens", [cu_seqlens], batch, length))

    @classmethod
    def from_ids(cls, ids: Tensor) -> Documents:
        """From a document id per token, (B, N) or (N,); ids must not decrease along a row (a run is a document)."""
        ids = _rows("Documents.from_ids", "ids", ids)
        if not torch.compiler.is_compiling() and bool((ids[:, 1:] < ids[:, :-1]).any()):
            raise ValueError("Documents.from_ids: ids decrease along a row; a document is a run of equal ids, so "
                             "give each document its own, increasing id")
        return cls(starts_of("ids", [ids], *ids.shape))

    @classmethod
    def from_positions(cls, position_ids: Tensor) -> Documents:
        """From position ids, (B, N) or (N,): a document begins where they do not increase (a restart at 0, at 1, at
        any position not past the last), as transformers' own packed-sequence detection splits them. Positions that
        jump forward stay in one document, where transformers would cut them: context-parallel shards carry their
        global positions, and the head and tail chunks of one sequence meet with such a jump."""
        positions = _rows("Documents.from_positions", "position_ids", position_ids)
        return cls(starts_of("starts", [starts_of_positions(positions)], *positions.shape))

    def check(self, q: Tensor, caller: str) -> None:
        """Reject documents that do not fit these (B, H, N, d) q."""
        if self.starts.dtype != torch.bool or self.starts.shape != (q.shape[0], q.shape[2]):
            raise ValueError(f"{caller}: documents.starts must be a bool (B, N) = ({q.shape[0]}, {q.shape[2]}) tensor "
                             f"for q{tuple(q.shape)}, got {_describe(self.starts)}")
        if self.starts.device != q.device:
            raise ValueError(f"{caller}: documents are on {self.starts.device}, q on {q.device}; move them to one device")


def starts_of_positions(positions: Tensor) -> Tensor:
    """(B, N) bool: where (B, N) position ids begin a document (they do not increase; every row's first token)."""
    return F.pad(positions[:, 1:] <= positions[:, :-1], (1, 0), value=True)


def starts_of(form: str, tensors: list[Tensor], batch: int, length: int) -> Tensor:
    """(B, N) bool document starts from a site's own tensors in one of ``passes.DocumentForm``'s forms (traceable)."""
    t = torch.arange(length, device=tensors[0].device)
    if form == "starts":
        starts = tensors[0]
    elif form == "ids":
        ids = tensors[0].reshape(-1, length)
        torch._assert_async((ids[:, 1:] >= ids[:, :-1]).all(), "lhcompile: the document ids of an attention mask "
                            "decrease along a row; Lighthouse per document takes a document to be a run of equal ids")
        starts = F.pad(ids[:, 1:] != ids[:, :-1], (1, 0))
    elif form == "cu_seqlens":
        total = batch * length
        flags = torch.zeros(total + 1, dtype=torch.bool, device=t.device)
        starts = flags.scatter(0, tensors[0].long().clamp(0, total), True)[:total].view(batch, length)
    elif form == "first_token":
        table, index = tensors
        starts = (table[index.long()] == t).unsqueeze(0)
    elif form == "last_token":
        ends = tensors[0].reshape(-1, length)
        starts = F.pad(ends[:, :-1] == t[:-1], (1, 0))
    elif form == "whole_rows":
        starts = t == 0
    else:
        raise ValueError(f"starts_of: unknown document form {form!r}")
    return starts.expand(batch, length) | (t == 0)


def longest_document(form: str, tensors: list[Tensor]) -> int:
    """The length of a batch's longest document, from a site's own tensors in one of ``starts_of``'s forms (one host
    read), never less than it is: where the rows are not known (cumulative lengths, 1-D ids or tables over rows laid
    end to end), a document may be counted across a row's end, which only overstates it."""
    if form == "cu_seqlens":
        return int(tensors[0].diff().max())
    if form == "first_token":
        tensors = [tensors[0], tensors[1].reshape(-1)]
    per_token = tensors[-1]
    batch, length = per_token.shape if per_token.dim() == 2 else (1, per_token.numel())
    return _Segments.of(starts_of(form, tensors, batch, length)).longest


def document_lengths(form: str, tensors: list[Tensor], batch: int, length: int) -> list[int]:
    """The lengths of a (batch, length) batch's documents, row after row, from a site's own tensors in one of
    ``starts_of``'s forms (one host read), found as ``starts_of`` finds them."""
    if form == "cu_seqlens":  # from the few boundaries themselves, not a flag per token
        total = batch * length
        bounds = sorted({min(max(int(c), 0), total) for c in tensors[0].tolist()} | set(range(0, total, length)))
        return [b - a for a, b in zip(bounds, bounds[1:] + [total]) if b > a]
    return _Segments.of(starts_of(form, tensors, batch, length)).lengths


def _describe(x: object) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:4]))}, ..., {values[-1]}]"


def _rows(caller: str, name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() not in (1, 2) or x.is_floating_point():
        raise ValueError(f"{caller}: {name} must be an integer (B, N) or (N,) tensor, got {_describe(x)}")
    return x if x.dim() == 2 else x.unsqueeze(0)


# -- the layout of the long documents --------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where each long document of a packed (B, N) batch lies in the relaid stream and in the gathered entries.

    Sizes are bounds fixed by (B, N) and the configuration; the tensors say what of them a batch uses."""

    batch: int
    length: int
    relaid_len: int
    """Length of the relaid stream: its last coarsest block is never used (entries past the last document's
    point there)."""
    gathered_len: int
    """Gathered entries of all long documents at most."""
    long: Tensor
    """(B, N) bool: the token belongs to a long document (Lighthouse), else to a short one (dense)."""
    relaid: Tensor
    """(B, N) int64: each long document's token's position in the relaid stream (0 for short documents')."""
    source: Tensor
    """(relaid_len,) int64: the packed token (b * N + t) at each relaid position, or -1 (padding, gaps)."""
    last_token: Tensor
    """(relaid_len,) int64: the packed token whose RoPE row rotates an entry ending at each relaid position (the
    document's last token for its zero padding, as the single-sequence operator clips)."""
    docs: Tensor
    """(3, slots) int32 for ``select_documents``: per document slot, the coarsest entries before it, its coarsest
    entries per tile (0: an unused slot), where its gathered entries start."""
    gathered_starts: Tensor
    """(1, gathered_len) bool: where each document's gathered entries begin."""
    gathered_used: Tensor
    """(1, gathered_len) bool: the entries some document uses."""

    @classmethod
    def of(cls, starts: Tensor, batch: int, length: int, config: LighthouseConfig) -> Layout:
        """The layout of a batch whose documents begin at ``starts`` (B, N) bool (traceable: sizes are static)."""
        g = config.geometry(0)
        span, unit, need = g.coarsest_span, g.unit, config.min_lighthouse_len
        # one slot at least: a dynamic length may be short. torch.sym_max keeps a symbolic length unguarded; on plain
        # ints it is Python's max (Dynamo of torch 2.11 refuses torch.sym_max returning an int)
        per_row = max(length // need, 1) if isinstance(length, int) else torch.sym_max(length // need, 1)
        slots = batch * per_row
        entries = g.top * g.children_per_tile * g.tiles  # a long document's entries beyond n / p^(L-1)
        relaid_len = -(-(batch * length + slots * (unit + span)) // span) * span + span
        gathered_len = (batch * length + slots * (unit - 1)) // span + slots * entries
        device = starts.device
        t = torch.arange(length, device=device)
        rows = torch.arange(batch, device=device).unsqueeze(1)
        starts = starts | (t == 0)
        doc = starts.long().cumsum(1) - 1  # each token's document, counted along its row
        # each document's first token (length for documents a row does not have), and its length
        first = torch.full((batch, length + 1), length, device=device).scatter(
            1, torch.where(starts, doc, length), torch.where(starts, t, length))
        n = first[:, 1:] - first[:, :-1]
        long = n >= need
        slot = torch.where(long, long.long().cumsum(1) - 1 + rows * per_row, slots)  # slot of each long document

        def per_slot(values: Tensor) -> Tensor:
            return torch.zeros(slots + 1, dtype=torch.long, device=device).scatter(
                0, slot.flatten(), values.flatten())[:slots]

        s_len = per_slot(torch.where(long, n, 0))
        s_pad = -(-s_len // unit) * unit
        s_first = per_slot(first[:, :-1] + rows * length)
        region = torch.where(s_len > 0, s_pad + span, 0)
        s_relaid = region.cumsum(0) - region
        s_entries = torch.where(s_len > 0, s_pad // span + entries, 0)
        s_gathered = s_entries.cumsum(0) - s_entries

        token_slot = slot.gather(1, doc)
        token_long = token_slot < slots
        offset = t - first.gather(1, doc)
        relaid = torch.where(token_long, F.pad(s_relaid, (0, 1))[token_slot] + offset, 0)
        flat = t + rows * length
        source = torch.full((relaid_len + 1,), -1, dtype=torch.long, device=device).scatter(
            0, torch.where(token_long, relaid, relaid_len).flatten(), flat.flatten())[:relaid_len]
        r = torch.arange(relaid_len, device=device)
        owner = (torch.searchsorted(s_relaid, r, right=True) - 1).clamp(0, slots - 1)
        last_token = (s_first[owner] + torch.minimum(r - s_relaid[owner], s_len[owner] - 1)).clamp(0, batch * length - 1)
        docs = torch.stack([s_relaid // span, s_pad // unit, s_gathered]).int()
        used = s_entries.sum()
        g_pos = torch.arange(gathered_len, device=device)
        gathered_starts = torch.zeros(gathered_len + 1, dtype=torch.bool, device=device).scatter(
            0, torch.where(s_entries > 0, s_gathered, gathered_len), True)[:gathered_len] | (g_pos == used)
        return cls(batch, length, relaid_len, gathered_len, token_long, relaid, source, last_token, docs,
                   gathered_starts.unsqueeze(0), (g_pos < used).unsqueeze(0))

    def relay(self, x: Tensor) -> Tensor:
        """The long documents of x (B, H, N, d) relaid: (1, H, relaid_len, d), zeros between them."""
        return _relay(x, self.source, self.relaid, self.long)

    def unrelay(self, o: Tensor) -> Tensor:
        """Relaid rows (1, H, relaid_len, d) back at their packed tokens: (B, H, N, d), zeros at short documents'."""
        return _unrelay(o, self.source, self.relaid, self.long)


# relay and unrelay are each other's adjoint (source and relaid are inverse maps between the long documents' tokens
# and the relaid positions that hold them), so each one's gradient is a gather by the other: no scatter-add, whose
# many rows landing on one index (every gap, every short token) would serialize on a GPU


@torch.library.custom_op("lhcompile::relay", mutates_args=())
def _relay(x: Tensor, source: Tensor, relaid: Tensor, long: Tensor) -> Tensor:
    b, h, n, d = x.shape
    tokens = x.transpose(1, 2).reshape(b * n, h * d)  # a free view of a model's (B, N, H, d) projections
    return ops.take_rows(tokens, source).view(1, -1, h, d).transpose(1, 2)


@_relay.register_fake
def _(x, source, relaid, long):
    return x.new_empty(1, source.shape[0], x.shape[1], x.shape[3]).transpose(1, 2)


@torch.library.custom_op("lhcompile::unrelay", mutates_args=())
def _unrelay(o: Tensor, source: Tensor, relaid: Tensor, long: Tensor) -> Tensor:
    b, n = long.shape
    h, d = o.shape[1], o.shape[3]
    rows = ops.take_rows(o[0].transpose(0, 1).reshape(-1, h * d), torch.where(long, relaid, -1).flatten())
    return rows.view(b, n, h, d).transpose(1, 2)


@_unrelay.register_fake
def _(o, source, relaid, long):
    return o.new_empty(long.shape[0], long.shape[1], o.shape[1], o.shape[3]).transpose(1, 2)


def _relay_backward(ctx, grad):
    return _unrelay(grad, *ctx.saved_tensors), None, None, None


def _unrelay_backward(ctx, grad):
    return _relay(grad, *ctx.saved_tensors), None, None, None


def _save_maps(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[1:])


_relay.register_autograd(_relay_backward, setup_context=_save_maps)
_unrelay.register_autograd(_unrelay_backward, setup_context=_save_maps)


# -- dense causal attention within documents -------------------------------------------------------------------


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
    flags = _host_flags(starts, keep)
    out, lse = _implementation(q)[0](q, k, v, _Segments.read(flags), scale)
    return _laid_out_as(out, _token_major(*q.shape[:3], v.shape[3], q)), lse.contiguous(), flags


@_document_attention.register_fake
def _(q, k, v, starts, keep, scale):
    _check_dtypes(q, k, v)
    return (_token_major(*q.shape[:3], v.shape[3], q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q)),
            torch.empty(1 if keep is None else 2, *starts.shape, dtype=torch.bool, device="cpu"))


@torch.library.custom_op("lhcompile::document_attention_backward", mutates_args=())
def _document_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                 flags: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    grads = _implementation(q)[1](grad, q, k, v, out, lse, _Segments.read(flags), scale)
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


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 stays: autocast leaves it alone


def autocast_like_sdpa(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v as autocast hands them to SDPA: in an autocast region of q's device type, those in fp32/fp16/bf16
    go to the region's dtype; outside one, as they are."""
    device_type = q.device.type
    if not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.device.type == device_type and t.dtype in _AUTOCAST_DTYPES else t

    return cast(q), cast(k), cast(v)


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

# q, k and v as SDPA takes them in an autocast region, for the graphs the pass rewrites: nothing outside one (the
# inputs themselves, no copy), the region's dtype inside one. An op, so that the rule holds where the graph runs,
# whatever the region is at the time the pass traces it
_LIBRARY.define("as_sdpa_inputs(Tensor(a) q, Tensor(b) k, Tensor(c) v) -> (Tensor(a), Tensor(b), Tensor(c))")
_LIBRARY.impl("as_sdpa_inputs", lambda q, k, v: (q, k, v), "CompositeImplicitAutograd")


def _register_as_sdpa_inputs(device_type: str, dispatch_key: str) -> None:
    def kernel(q, k, v):
        q, k, v = autocast_like_sdpa(q, k, v)
        with torch.autocast(device_type, enabled=False):
            return torch.ops.lhcompile.as_sdpa_inputs(q, k, v)

    _LIBRARY.impl("as_sdpa_inputs", kernel, dispatch_key)


_register_as_sdpa_inputs("cpu", "AutocastCPU")
_register_as_sdpa_inputs("cuda", "AutocastCUDA")


def document_attention(q: Tensor, k: Tensor, v: Tensor, documents: Documents, *, scale: float | None = None,
                       keep: Tensor | None = None) -> Tensor:
    """Dense causal attention within each document: (B, H, N, d) in SDPA's layout, k/v may have fewer heads (GQA).

    ``keep`` (B, N) bool, the same for every token of a document, leaves whole documents out (their outputs are 0
    and cost nothing on a GPU). On CUDA in bf16/fp16, the documents are read on the host once per forward (the
    backward reuses that copy), and split into kernel calls by ``_Segments.calls``: cuDNN's attention for documents
    of one padded width together, flash varlen for the rest; elsewhere (CPU, fp32): a reference, document by
    document, that holds each document's score matrix (for tests and modest lengths)."""
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
    k, v = _grouped(k, q.shape[1]), _grouped(v, q.shape[1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out if keep is None else out * keep[:, None, :, None]


def runs_kernels(device: torch.device | None, dtype: torch.dtype | None) -> bool:
    """Whether ``document_attention`` runs its GPU kernels (cuDNN batches, flash varlen) on tensors of this device
    and dtype; elsewhere, and in full precision, it runs a reference document by document."""
    return getattr(device, "type", None) == "cuda" and dtype in (torch.bfloat16, torch.float16)


def _implementation(q: Tensor):
    fast = runs_kernels(q.device, q.dtype)
    return (_gpu_forward, _gpu_backward) if fast else (_reference_forward, _reference_backward)


def _grouped(x: Tensor, heads: int) -> Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def _wide(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _causal_probabilities(q: Tensor, k: Tensor, scale: float, lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax of one document's causal scores (and its log-sum-exp), in fp32 at least."""
    n = q.shape[2]
    scores = (_wide(q) @ _wide(_grouped(k, q.shape[1])).transpose(-1, -2) * scale).masked_fill(
        ~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse = torch.logsumexp(scores, -1) if lse is None else lse
    return (scores - lse[..., None]).exp(), lse


def _documents(segments: _Segments, n: int) -> list[tuple[int, slice]]:
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


def _reference_forward(q, k, v, segments, scale):
    h = q.shape[1]
    out = q.new_zeros(*q.shape[:3], v.shape[3])
    lse = q.new_full(q.shape[:3], float("-inf"), dtype=_lse_dtype(q))
    for b, t in _documents(segments, q.shape[2]):
        o, m = _one_forward(*(x[b : b + 1, :, t].contiguous() for x in (q, _grouped(k, h), _grouped(v, h))), scale)
        out[b, :, t], lse[b, :, t] = o[0], m[0].to(lse.dtype)
    return out, lse


def _reference_backward(grad, q, k, v, out, lse, segments, scale):
    h, group = q.shape[1], q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def ungroup(x: Tensor) -> Tensor:
        return x if group == 1 else x.view(x.shape[0], -1, group, *x.shape[2:]).sum(2)

    for b, t in _documents(segments, q.shape[2]):
        part = [x[b : b + 1, :, t].contiguous() for x in (grad, q, _grouped(k, h), _grouped(v, h), out)]
        m = lse[b : b + 1, :, t].contiguous()
        if q.device.type == "cpu":
            m = m.to(torch.promote_types(q.dtype, torch.float32))
        gq, gk, gv = _one_backward(*part, m, scale)
        dq[b, :, t], dk[b, :, t], dv[b, :, t] = gq[0], ungroup(gk)[0].to(k.dtype), ungroup(gv)[0].to(v.dtype)
    return dq, dk, dv


@dataclass(frozen=True)
class _Segments:
    """The documents a GPU kernel computes, found on the host from one copy of the flags (``_host_flags``): per
    document its first token among the batch's rows laid end to end, and its length. Every device tensor built from
    them travels from pinned memory without waiting for the GPU, and every placement goes through views or indices,
    never through a boolean mask (whose nonzero would wait for the GPU once more)."""

    firsts: list[int]
    lengths: list[int]

    @classmethod
    def of(cls, starts: Tensor, keep: Tensor | None = None) -> _Segments:
        """The documents of (B, N) ``starts`` (each row's first token begins one, whatever its flag) that ``keep``
        keeps."""
        return cls.read(_host_flags(starts, keep))

    @classmethod
    def read(cls, flags: Tensor) -> _Segments:
        """The documents of ``_host_flags``' copy."""
        # numpy: torch's nonzero on the host takes ~15x as long on 128K flags (0.56 against 0.036 ms)
        flags = flags.numpy()
        first = np.flatnonzero(flags[0])
        lengths = np.diff(first, append=flags[0].size)
        if len(flags) > 1:
            kept = flags[1].reshape(-1)[first]
            first, lengths = first[kept], lengths[kept]
        return cls(first.tolist(), lengths.tolist())

    @property
    def longest(self) -> int:
        return max(self.lengths)

    def calls(self, key: tuple) -> list[_Call]:
        """The kernel calls that compute these documents, each document in one: documents of one ``padded_width``
        run together on cuDNN, in batches of a power of two (which bounds their shapes); long documents (at least
        ``CUDNN_MIN_LENGTH`` tokens) always, short ones two or more and ``CUDNN_MIN_BATCH`` positions at a time
        while ``_admit`` allows the shape (``key``: the rest of what a cuDNN plan depends on); every other document
        goes to one flash varlen call."""
        if CUDNN_MIN_LENGTH is None:
            return [_Call.flash(self.firsts, self.lengths)] if self.lengths else []
        batches, flash = [], []
        for members, width, long in _parts(self.lengths):
            if _batched(members, width) and _admit((len(members), width, *key)):
                batches.append((members, width))
            elif long:
                batches += [([i], width) for i in members]
            else:
                flash += members
        calls = [_Call.cudnn([self.firsts[i] for i in part], [self.lengths[i] for i in part], width)
                 for part, width in batches]
        flash.sort()
        return calls + ([_Call.flash([self.firsts[i] for i in flash], [self.lengths[i] for i in flash])] if flash else [])


def _host_flags(starts: Tensor, keep: Tensor | None) -> Tensor:
    """(1, B, N) bool ``starts`` with each row's first token set, or (2, B, N) with ``keep``, copied to the host:
    the one wait for the GPU of a call."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "lhcompile: Lighthouse per document and lhcompile.document_attention find the documents of each batch "
            "on the host (one copy of the document flags per call), which a CUDA graph cannot capture; run them "
            "without CUDA graphs (torchtitan: --training.disable_cuda_graphs; torch.compile: a mode other than "
            "'reduce-overhead')")
    flags = torch.stack([starts] if keep is None else [starts, keep]).to("cpu", copy=True)
    flags[0, :, 0] = True
    return flags


def _parts(lengths: list[int]) -> list[tuple[list[int], int, bool]]:
    """The documents (indices into ``lengths``) as cuDNN may batch them: of one ``padded_width``, long (at least
    ``CUDNN_MIN_LENGTH`` tokens) or not, in parts of a power of two; each part with its width and whether it is
    long."""
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault((padded_width(n), n >= CUDNN_MIN_LENGTH), []).append(i)
    parts = []
    for (width, long), members in groups.items():
        for size in _powers_of_two(len(members)):
            parts.append((members[:size], width, long))
            members = members[size:]
    return parts


def _batched(members: list[int], width: int) -> bool:
    return len(members) > 1 and len(members) * width >= CUDNN_MIN_BATCH


def cudnn_share(lengths: list[int]) -> float:
    """The share of the attention work of documents of these lengths (n^2 each) that ``document_attention`` runs on
    cuDNN on a GPU: long documents, and short ones in batches of their width while ``_admit`` has room for the
    batch's shape or has one like it (of any heads and dtype: close enough for a choice of kernel)."""
    if CUDNN_MIN_LENGTH is None or not lengths:
        return 0.0
    on_cudnn = sum(lengths[i] ** 2 for members, width, long in _parts(lengths)
                   if long or _batched(members, width) and _room(len(members), width) for i in members)
    return on_cudnn / sum(n * n for n in lengths)


DENSE_SHARE = 0.9
"""A batch without a long document runs ``document_attention`` in place of the model's own kernel (the pass's
``document_probe.DENSE`` graph) where at least this share of its attention work runs on cuDNN (``cudnn_share``).
Measured on an H100 at 128K tokens (BENCHMARKS.md, 2026-12-07): with all of the work on cuDNN (16 x 8K, 128 x 1K)
``document_attention`` took 0.74-0.82x the time of FlexAttention and 0.62-0.77x that of flash varlen, with 94% (14
documents of random lengths around 8K) 0.92-0.93x and 0.81-0.83x, with 63% (37 around 3K, before
``CUDNN_MIN_BATCH``) 1.47-1.48x and 1.24-1.29x: the rest runs on flash varlen, and documents not laid end to end
are gathered and scattered."""


def _powers_of_two(count: int) -> list[int]:
    """count as a sum of distinct powers of two, the largest first."""
    return [1 << b for b in reversed(range(count.bit_length())) if count >> b & 1]


CUDNN_BATCH_SHAPES = 32
"""Most shapes of cuDNN batches of several documents one process builds plans for. A plan costs about 0.4-0.8 s
(BENCHMARKS.md); a long document alone has one of a bounded set of widths, but batches also vary in their count of
documents, so past this many shapes a batch of short documents runs on flash varlen and one of long documents one
document at a time. The choice only grows (a shape admitted stays admitted), so a backward makes its forward's."""
_CUDNN_SHAPES: set[tuple] = set()


def _admit(shape: tuple) -> bool:
    if shape not in _CUDNN_SHAPES and len(_CUDNN_SHAPES) < CUDNN_BATCH_SHAPES:
        _CUDNN_SHAPES.add(shape)
    return shape in _CUDNN_SHAPES


def _room(size: int, width: int) -> bool:
    return len(_CUDNN_SHAPES) < CUDNN_BATCH_SHAPES or any(shape[:2] == (size, width) for shape in _CUDNN_SHAPES)


@dataclass(frozen=True)
class _Call:
    """One kernel call's documents: ``cu`` (D+1,) int32 for flash varlen, or None for a cuDNN batch of (G, W)
    positions, each document right-padded (its last token repeated) to the batch's width W. Its tokens among the
    batch's rows laid end to end are consecutive from ``start`` (read and written as views, no copy) or given by
    ``index``, with ``own`` marking a padded batch's positions that are a document's own."""

    shape: tuple[int, ...]
    """(L,) tokens for flash, (G, W) for cuDNN."""
    start: int | None
    index: Tensor | None
    own: Tensor | None
    cu: Tensor | None
    longest: int

    @classmethod
    def flash(cls, firsts: list[int], lengths: list[int]) -> _Call:
        total = sum(lengths)
        cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
        if _consecutive(firsts, lengths):
            return cls((total,), firsts[0], None, None, cu, max(lengths))
        first, size = torch.tensor(firsts), torch.tensor(lengths)
        index = torch.repeat_interleave(first - cu[:-1], size, output_size=total) + torch.arange(total)
        return cls((total,), None, index, None, cu, max(lengths))

    @classmethod
    def cudnn(cls, firsts: list[int], lengths: list[int], width: int) -> _Call:
        """Right padding never reaches a document's own rows in causal attention."""
        shape = (len(firsts), width)
        if all(n == width for n in lengths) and _consecutive(firsts, lengths):
            return cls(shape, firsts[0], None, None, None, width)
        offset = torch.arange(width)[None]
        first, size = torch.tensor(firsts)[:, None], torch.tensor(lengths)[:, None]
        return cls(shape, None, first + torch.minimum(offset, size - 1), offset < size, None, width)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def take(self, rows: Tensor) -> Tensor:
        """The call's positions of rows (T, ...): (*shape, ...)."""
        if self.index is None:
            return rows[self.start : self.start + self.size].view(*self.shape, *rows.shape[1:])
        return rows[self.index]

    def covers(self, total: int) -> bool:
        return self.start == 0 and self.size == total

    def put(self, buffer: Tensor, values: Tensor) -> None:
        """Write the call's values (*shape, ...) at its documents' own tokens of buffer (T + 1, ...), whose last row
        takes padded positions and is dropped."""
        rows = values.reshape(self.size, *values.shape[len(self.shape):])
        if self.index is None:
            buffer[self.start : self.start + self.size] = rows
        elif self.own is None:
            buffer.index_copy_(0, self.index, rows)
        else:
            buffer.index_put_((torch.where(self.own, self.index, buffer.shape[0] - 1).flatten(),), rows)


def _consecutive(firsts: list[int], lengths: list[int]) -> bool:
    return all(a + n == b for a, n, b in zip(firsts, lengths, firsts[1:]))


def _on_device(calls: list[_Call], device: torch.device) -> list[_Call]:
    """The calls with their index tables on ``device``: one copy from pinned memory per dtype for all of them (which
    does not wait for the GPU), each table a view of it."""
    tables = [t for call in calls for t in (call.index, call.own, call.cu) if t is not None]
    moved: dict[int, Tensor] = {}
    for dtype in {t.dtype for t in tables}:
        same = [t for t in tables if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        flat = (flat.pin_memory() if device.type == "cuda" else flat).to(device, non_blocking=True)
        for t, part in zip(same, flat.split([t.numel() for t in same])):
            moved[id(t)] = part.view(t.shape)
    move = (lambda t: None if t is None else moved[id(t)])
    return [_Call(c.shape, c.start, move(c.index), move(c.own), move(c.cu), c.longest) for c in calls]


def _assemble(parts: list[tuple[_Call, Tensor]], total: int, like: Tensor, fill: float) -> Tensor:
    """Rows (total, ...) of the calls' values at their tokens, ``fill`` at tokens no call computes; a call that
    computes every token gives its values as they are."""
    if len(parts) == 1 and parts[0][0].covers(total):
        call, values = parts[0]
        return values.reshape(total, *values.shape[len(call.shape):])
    buffer = like.new_full((total + 1, *like.shape[1:]), fill)
    for call, values in parts:
        call.put(buffer, values)
    return buffer[:-1]


def padded_width(n: int) -> int:
    """The cuDNN width of a document of n tokens: n rounded up on a grid of 16 widths per octave (at most 1/16
    more), and at least ``MIN_WIDTH``. cuDNN builds an execution plan per new shape (about 0.4-0.8 s for forward and
    backward, BENCHMARKS.md), so a width per document length would build plans on every batch of real documents;
    the grid bounds them to 16 per octave for a whole training run."""
    step = 1 << max(n.bit_length() - 5, 0)
    return max(-(-n // step) * step, MIN_WIDTH)


CUDNN_MIN_LENGTH: int | None = 8192
"""Documents of at least this many tokens run on cuDNN's attention (faster than flash varlen on long documents),
padded to ``padded_width``, alone or with others of their width; shorter ones run on cuDNN only in batches of their
width (``CUDNN_MIN_BATCH``, ``CUDNN_BATCH_SHAPES``), all others together in one flash varlen call, which builds no
plans and takes any mix of lengths. None: flash varlen for every document."""
MIN_WIDTH = 16
"""Narrowest cuDNN width: cuDNN refuses a sequence of one token."""
CUDNN_MIN_BATCH = 16384
"""Fewest positions (documents x width) of a cuDNN batch of short documents; smaller ones go to the flash varlen
call. On an H100 (BENCHMARKS.md, 2026-12-07), 21 batches of 2-4 documents of 1-6K tokens beside one flash varlen
call for the rest took 1.9-2.0x the time of flash varlen on all 76 documents (37 documents around 3K: 1.24-1.29x),
while one batch of 128 x 1K took 0.75-0.77x."""


def _token_rows(x: Tensor) -> Tensor:
    """(B, H, N, d) -> (B * N, H, d): the layout a model's projections give, in which tokens are gathered."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def _gpu_calls(segments: _Segments, q: Tensor, v: Tensor) -> list[_Call]:
    return _on_device(segments.calls((q.shape[1], q.shape[3], v.shape[3], q.dtype)), q.device)


def _gpu_forward(q, k, v, segments, scale):
    b, h, n = q.shape[:3]
    rows = [_token_rows(t) for t in (q, _grouped(k, h), _grouped(v, h))]
    outs, lses = [], []
    for call in _gpu_calls(segments, q, v):
        x = [call.take(r) for r in rows]
        if call.cu is not None:
            o, m, *_ = torch.ops.aten._flash_attention_forward(*x, call.cu, call.cu, call.longest, call.longest, 0.0,
                                                               True, False, scale=scale)
            m = m.t()
        else:
            o, m, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                *(t.transpose(1, 2) for t in x), None, True, 0.0, True, False, scale=scale)
            o, m = o.transpose(1, 2), m.reshape(o.shape[0], h, -1).transpose(1, 2)  # cuDNN's is (G, H, W, 1)
        outs.append((call, o))
        lses.append((call, m))
    out = _assemble(outs, b * n, rows[2], 0.0)
    lse = _assemble(lses, b * n, rows[0].new_empty(0, h, dtype=torch.float32), float("-inf"))
    return out.view(b, n, h, -1).transpose(1, 2), lse.view(b, n, h).transpose(1, 2).contiguous()


def _gpu_backward(grad, q, k, v, out, lse, segments, scale):
    b, h, n = q.shape[:3]
    rows = [_token_rows(t) for t in (grad, q, _grouped(k, h), _grouped(v, h), out)]
    lse_rows = lse.transpose(1, 2).reshape(b * n, h)
    parts: list[list] = [[], [], []]
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    for call in _gpu_calls(segments, q, v):
        g, qx, kx, vx, ox = (call.take(r) for r in rows)
        m = call.take(lse_rows)
        if call.cu is not None:
            grads = torch.ops.aten._flash_attention_backward(
                g, qx, kx, vx, ox, m.t().contiguous(), call.cu, call.cu, call.longest, call.longest, 0.0, True,
                torch.zeros(2, dtype=torch.uint64, device=q.device), torch.empty(0, device=q.device), scale=scale)
        else:
            if call.own is not None:
                g = g * call.own[..., None, None]  # padded rows take no part in the gradients of the document's own
            grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                *(t.transpose(1, 2) for t in (g, qx, kx, vx, ox)), m.transpose(1, 2).unsqueeze(-1).contiguous(),
                zero, zero, None, None, None, call.longest, call.longest, 0.0, True, scale=scale)
            grads = [t.transpose(1, 2) for t in grads]
        for total, part in zip(parts, grads):
            total.append((call, part))
    dq, dk, dv = (_assemble(p, b * n, r, 0.0).view(b, n, h, -1).transpose(1, 2) for p, r in zip(parts, rows[1:4]))
    group = h // k.shape[1]
    if group > 1:
        dk, dv = (t.reshape(b, k.shape[1], group, n, -1).sum(2) for t in (dk, dv))
    return dq, dk, dv


# -- Lighthouse per document -----------------------------------------------------------------------------------


def lighthouse_documents(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, *, batch: int, length: int,
                         scale: float, config: LighthouseConfig, rotary: Rotary | None = None) -> Tensor:
    """Lighthouse per document over a packed (B, H, N, d) batch whose documents begin at ``starts`` (B, N) bool;
    traceable (shapes are plain ints, or symbolic). With ``rotary`` (the model's tables by packed token, positions
    restarting with each document) q and k come unrotated: every gathered entry is rotated at the last token it
    covers, a short document's tokens at their own.

    Run eagerly, the batch's documents pick the work (one host read of the document flags), since the general
    path's stages are sized for the most long documents a batch could hold: a batch with no document of at least
    ``config.min_lighthouse_len`` tokens gets dense attention within each document alone, a batch of one document
    per row plain Lighthouse on each row. Traced (torch.compile, the pass) every batch takes the general path: a
    graph cannot choose without ``torch.cond``, whose backward recomputes its branch's forward (BENCHMARKS.md);
    lhcompile's backend makes the same two choices per call instead, between graphs compiled for each
    (``lhcompile.document_probe``)."""
    if not (isinstance(starts, fx.Proxy) or torch.compiler.is_compiling() or is_fake(starts)):
        found = _Segments.of(starts)
        if found.longest < config.min_lighthouse_len:
            return dense_documents(q, k, v, starts, batch=batch, length=length, scale=scale, rotary=rotary)
        if len(found.lengths) == batch:
            return ops.lighthouse_stages(q, k, v, n=length, scale=scale, config=config, rotary=rotary)
    return _every_document(q, k, v, starts, batch=batch, length=length, scale=scale, config=config, rotary=rotary)


def dense_documents(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, *, batch: int, length: int, scale: float,
                    rotary: Rotary | None = None, keep: Tensor | None = None) -> Tensor:
    """Dense causal attention within each document (of those ``keep`` keeps); with ``rotary`` (tables by packed
    token) q and k come unrotated and are rotated at their own tokens first."""
    if rotary is not None:
        q, k = rotary.by_token(batch, length).rotate(
            torch.arange(batch * length, device=q.device).view(batch, 1, length), q, k)
    return _document_attention(q, k, v, starts, keep, scale)[0]


def _every_document(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, *, batch: int, length: int, scale: float,
                    config: LighthouseConfig, rotary: Rotary | None = None) -> Tensor:
    """Every document on its own, whatever the mix: the general path of ``lighthouse_documents``. Any length runs
    (shapes may be symbolic): all documents of a row shorter than ``config.min_lighthouse_len`` are dense."""
    levels, p = config.levels, config.pooling_factor
    layout = Layout.of(starts, batch, length, config)
    qr, kr, vr = (layout.relay(t) for t in (q, k, v))
    s_qk, s_kq = ops.score(qr.detach(), kr.detach(), levels, p)
    index, inv = ops.select_documents(s_qk, s_kq, layout.docs, layout.gathered_len, layout.relaid_len, levels, p,
                                      config.topk, config.tile_budget)
    qg, kg, vg = (ops.gather(t, index, inv, levels, p) for t in (qr, kr, vr))
    if rotary is not None:
        qg, kg = rotary.by_token(batch, length).rotate(
            layout.last_token[entry_positions(index, layout.relaid_len, levels, p)], qg, kg)
    og = _document_attention(qg, kg, vg, layout.gathered_starts, layout.gathered_used, scale)[0]
    long = layout.unrelay(ops.scatter(og, index, inv, layout.relaid_len, levels, p))
    short = dense_documents(q, k, v, starts, batch=batch, length=length, scale=scale, rotary=rotary,
                            keep=~layout.long)
    return long + short  # each is exactly zero at the other's tokens
