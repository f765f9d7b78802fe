"""Where the rewritten attention runs: one device, or a sequence sharded across a context-parallel group.

A placement is chosen once, by ``apply``'s arguments, and answers what the pass asks of every attention site:
can a sequence of this length run Lighthouse here, what replaces a Lighthouse site, and what replaces a site
kept dense. Replacements take and give SDPA's (B, H, N, d) layout (each site kind maps its own call to it) and
the site's documents as a (B, N) bool of starts, or None for plain causal attention. The two placements'
replacements stand side by side, as Inductor's pattern/replacement pairs do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..operator import context_parallel, lighthouse
from ..config import LighthouseConfig
from ..operator.documents import lighthouse_documents
from ..passes import Site
from ..operator.rotary import Rotary


@dataclass(frozen=True)
class Inputs:
    """A site's attention inputs as its replacement is built (graph values as fx.Proxy): SDPA's (B, H, N, d)
    layout, the softmax scale, the documents' starts (None: plain causal) and the batch and length (ints, or graph
    values where the length is dynamic)."""

    q: Any
    k: Any
    v: Any
    scale: Any
    starts: Any
    batch: Any
    length: Any


class Placement(Protocol):
    dense_note: str
    """Added to the reason of every site kept dense."""
    rewrites_dense: bool
    """Whether every site kept dense is rewritten too (into ``dense``); else only those proven plainly causal."""
    any_length: bool
    """Whether a plainly causal site at a dynamic length runs Lighthouse (per document, one per row, whose
    lengths are data); else it stays dense."""
    runtime_masks: bool
    """Whether a site handed an explicit mask it cannot prove causal at capture may run Lighthouse at the calls
    where the mask is the causal one (checked at each call), keeping its call with its mask at the others."""

    def check(self, site: Site) -> None:
        """Raise if this placement cannot run the graph because of this site."""

    def problem(self, config: LighthouseConfig, n: int) -> str | None:
        """Why a sequence of n tokens cannot run Lighthouse here, or None."""

    def lighthouse(self, site: Site, x: Inputs, config: LighthouseConfig, rotary: Rotary | None) -> Any:
        """The replacement of a site chosen for Lighthouse (with ``rotary``, q and k are the unrotated values)."""

    def dense(self, site: Site, x: Inputs) -> Any | None:
        """The replacement of a site kept dense, or None to leave the call as it is (always asked for sites
        proven plainly causal)."""


@dataclass(frozen=True)
class SingleDevice:
    """One device: a Lighthouse site becomes the staged operator (per document where it has documents); a dense
    site is left as it is, except that one proven plainly causal gives way to SDPA with is_causal=True (the same
    result without its mask)."""

    dense_note = ""
    rewrites_dense = False
    any_length = True
    runtime_masks = True

    def check(self, site: Site) -> None:
        pass

    def problem(self, config: LighthouseConfig, n: int) -> str | None:
        if n < config.min_lighthouse_len:
            return f"sequence too short: N={n} < min_lighthouse_len={config.min_lighthouse_len}"
        return None

    def lighthouse(self, site: Site, x: Inputs, config: LighthouseConfig, rotary: Rotary | None) -> Any:
        if x.starts is not None:
            return lighthouse_documents(x.q, x.k, x.v, x.starts, batch=x.batch, length=x.length, scale=x.scale,
                                        config=config, rotary=rotary)
        return lighthouse.lighthouse_stages(x.q, x.k, x.v, n=x.length, scale=x.scale, config=config, rotary=rotary)

    def dense(self, site: Site, x: Inputs) -> Any | None:
        if not site.causal_proven:
            return None
        return F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, scale=x.scale,
                                              enable_gqa=site.q_shape[1] != site.k_shape[1])


@dataclass(frozen=True)
class ContextParallel:
    """Each rank holds chunks r and 2W-1-r of every sequence (see ``lhcompile.context_parallel``): a Lighthouse
    site selects per chunk and joins PyTorch's ring attention with its gathered tokens; every other site becomes
    ring attention too, since a shard's attention must see the whole sequence either way. PyTorch's ring attention
    is causal only: a site whose documents come from position ids (``causal_sdpa``) runs on the condition, checked
    at run time, that the shard holds no document start (positions never start anew); varlen and FlexAttention
    document masks are refused at capture."""

    group: dist.ProcessGroup
    dense_note = "; dense ring attention across the context-parallel group"
    rewrites_dense = True
    any_length = False
    runtime_masks = False  # every site becomes ring attention, which cannot keep a mask

    @classmethod
    def make(cls, group: dist.ProcessGroup, config: LighthouseConfig) -> ContextParallel:
        context_parallel.chunk_config(config)  # fail at apply, not at the first forward call
        return cls(group)

    @property
    def alone(self) -> bool:
        """A group of one rank: its shard is the whole sequence in order, and attention needs no exchange."""
        return self.group.size() == 1

    def check(self, site: Site) -> None:
        where = f"site {site.index} (module {site.module_path or '<top>'!r})"
        if site.problem:
            raise ValueError(f"lhcompile: under context parallelism every attention site must become ring attention, "
                             f"but {where} cannot: {site.problem}")
        if site.documents is not None and site.documents.form != "starts":
            raise ValueError(f"lhcompile: {where} attends within packed documents ({site.documents.description}), "
                             "but context parallelism runs PyTorch's ring attention, which is causal only; train "
                             "without document masks under context parallelism, or on one device")

    def problem(self, config: LighthouseConfig, n: int) -> str | None:
        return context_parallel.chunk_problem(config, n)

    def lighthouse(self, site: Site, x: Inputs, config: LighthouseConfig, rotary: Rotary | None) -> Any:
        _one_document(x.starts)
        return context_parallel.lighthouse_stages_cp(x.q, x.k, x.v, n=x.length, group_name=self.group.group_name,
                                                     scale=x.scale, config=config, rotary=rotary, alone=self.alone)

    def dense(self, site: Site, x: Inputs) -> Any | None:
        _one_document(x.starts)
        if self.alone:
            return F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, scale=x.scale,
                                                  enable_gqa=site.q_shape[1] != site.k_shape[1])
        b, h, n, d = site.q_shape
        exchanged = 2 * b * h * n * d  # keys and values of the shard, one query head each, in one collective
        if exchanged >= 2**31:
            raise ValueError(
                f"lhcompile: site {site.index} (module {site.module_path or '<top>'!r}) stays dense under context "
                f"parallelism, and its ring attention would exchange {exchanged} elements (keys and values of a "
                f"{b}x{h}x{n}x{d} shard) in one NCCL collective, which takes fewer than 2^31; use more ranks, or let "
                "the layer run Lighthouse (dense_layers, filter_fn)")
        return context_parallel.dense_stages_cp(x.q, x.k, x.v, gqa_groups=site.q_shape[1] // site.k_shape[1],
                                                group_name=self.group.group_name, scale=x.scale)


def _one_document(starts: Any) -> None:
    if starts is not None:
        torch._assert_async(~starts[:, 1:].any(), "lhcompile: a context-parallel shard holds the start of a packed "
                            "document (position_ids start anew), but ring attention is causal only: train packed "
                            "documents on one device")
