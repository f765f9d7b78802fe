"""Where the documents of a packed batch begin: the ``Documents`` API, the forms in which models hold them
(``starts_of``), and the host's view of one batch's documents (``Segments``, from one copy of the flags)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Documents:
    """Where the documents of a packed batch begin: ``starts`` (B, N) bool, True at each document's first token.

    Every row begins a document; a document never spans two rows. Build it from what the data pipeline has:
    ``from_cu_seqlens`` (varlen's cumulative lengths over the batch's rows laid end to end), ``from_ids`` (a
    document id per token; a document is a run of equal ids) or ``from_positions`` (position ids that start anew
    with each document, as torchtitan and Hugging Face's DataCollatorWithFlattening make them). The constructors
    check their argument's values (one host sync), except while torch.compile traces them.

    Example::

        Documents.from_cu_seqlens(torch.tensor([0, 70, 110, 192], dtype=torch.int32), length=192)
        Documents.from_positions(torch.cat([torch.arange(70), torch.arange(40), torch.arange(82)]))
    """

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
    return Segments.of(starts_of(form, tensors, batch, length)).longest


def document_lengths(form: str, tensors: list[Tensor], batch: int, length: int) -> list[int]:
    """The lengths of a (batch, length) batch's documents, row after row, from a site's own tensors in one of
    ``starts_of``'s forms (one host read), found as ``starts_of`` finds them."""
    if form == "cu_seqlens":  # from the few boundaries themselves, not a flag per token
        total = batch * length
        bounds = sorted({min(max(int(c), 0), total) for c in tensors[0].tolist()} | set(range(0, total, length)))
        return [b - a for a, b in zip(bounds, bounds[1:] + [total]) if b > a]
    return Segments.of(starts_of(form, tensors, batch, length)).lengths


def _describe(x: object) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:4]))}, ..., {values[-1]}]"


def _rows(caller: str, name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() not in (1, 2) or x.is_floating_point():
        raise ValueError(f"{caller}: {name} must be an integer (B, N) or (N,) tensor, got {_describe(x)}")
    return x if x.dim() == 2 else x.unsqueeze(0)



@dataclass(frozen=True)
class Segments:
    """The documents a GPU kernel computes, found on the host from one copy of the flags (``host_flags``): per
    document its first token among the batch's rows laid end to end, and its length. Every device tensor built from
    them travels from pinned memory without waiting for the GPU, and every placement goes through views or indices,
    never through a boolean mask (whose nonzero would wait for the GPU once more)."""

    firsts: list[int]
    lengths: list[int]

    @classmethod
    def of(cls, starts: Tensor, keep: Tensor | None = None) -> Segments:
        """The documents of (B, N) ``starts`` (each row's first token begins one, whatever its flag) that ``keep``
        keeps."""
        return cls.read(host_flags(starts, keep))

    @classmethod
    def read(cls, flags: Tensor) -> Segments:
        """The documents of ``host_flags``' copy."""
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


def host_flags(starts: Tensor, keep: Tensor | None) -> Tensor:
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

