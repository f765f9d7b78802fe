"""Where the rewritten attention runs: one device, or a sequence sharded across a context-parallel group.

A target is chosen once, by ``apply``'s arguments, and answers the three questions the pass asks of every SDPA
site: can a sequence of this length run Lighthouse here, what replaces a Lighthouse site, and what replaces a
site kept dense. The two targets' replacements stand side by side, as Inductor's pattern/replacement pairs do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F

from . import context_parallel, ops
from .config import LighthouseConfig
from .passes import SdpaSite
from .rotary import Rotary


class Target(Protocol):
    dense_note: str
    """Added to the reason of every site kept dense."""
    rewrites_dense: bool
    """Whether every site kept dense is rewritten too (into ``dense``); else only those with a causal mask."""

    def check(self, site: SdpaSite) -> None:
        """Raise if this target cannot run the graph because of this site."""

    def problem(self, config: LighthouseConfig, n: int) -> str | None:
        """Why a sequence of n tokens cannot run Lighthouse on this target, or None."""

    def lighthouse(self, site: SdpaSite, args: dict[str, Any], config: LighthouseConfig, rotary: Rotary | None
                   ) -> fx.Proxy:
        """The replacement of a site chosen for Lighthouse (args: the call's arguments as proxies; with ``rotary``
        their query and key are the unrotated values, to be rotated after selection)."""

    def dense(self, site: SdpaSite, args: dict[str, Any]) -> fx.Proxy | None:
        """The replacement of a site kept dense, or None to leave the SDPA call as it is (always called for sites
        whose explicit mask is proven causal)."""


@dataclass(frozen=True)
class SingleDevice:
    """One device: a Lighthouse site becomes the staged operator; a dense site is left as it is, except that an
    explicit mask proven causal gives way to is_causal=True (the same result without the N x N mask)."""

    dense_note = ""
    rewrites_dense = False

    def check(self, site: SdpaSite) -> None:
        pass

    def problem(self, config: LighthouseConfig, n: int) -> str | None:
        if n < config.min_lighthouse_len:
            return f"sequence too short: N={n} < min_lighthouse_len={config.min_lighthouse_len}"
        return None

    def lighthouse(self, site: SdpaSite, args: dict[str, Any], config: LighthouseConfig, rotary: Rotary | None
                   ) -> fx.Proxy:
        return ops.lighthouse_stages(args["query"], args["key"], args["value"], n=site.q_shape[2],
                                     scale=args.get("scale"), config=config, rotary=rotary)

    def dense(self, site: SdpaSite, args: dict[str, Any]) -> fx.Proxy | None:
        if not site.causal_mask:
            return None
        # the mask is the causal mask: is_causal=True computes the same without it, on SDPA's flash and cuDNN paths
        return F.scaled_dot_product_attention(args["query"], args["key"], args["value"],
                                              dropout_p=args.get("dropout_p") or 0.0, is_causal=True,
                                              scale=args.get("scale"), enable_gqa=site.q_shape[1] != site.k_shape[1])


@dataclass(frozen=True)
class ContextParallel:
    """Each rank holds chunks r and 2W-1-r of every sequence (see ``lhcompile.context_parallel``): a Lighthouse
    site selects per chunk and joins PyTorch's ring attention with its gathered tokens; every other site becomes
    ring attention too, since a shard's attention must see the whole sequence either way."""

    group: dist.ProcessGroup
    dense_note = "; dense ring attention across the context-parallel group"
    rewrites_dense = True

    @classmethod
    def make(cls, group: dist.ProcessGroup, config: LighthouseConfig) -> ContextParallel:
        context_parallel.chunk_config(config)  # fail at apply, not at the first forward call
        return cls(group)

    def check(self, site: SdpaSite) -> None:
        if site.problem:
            raise ValueError(
                f"lhcompile: under context parallelism every SDPA site must become ring attention, but site "
                f"{site.index} (module {site.module_path or '<top>'!r}) cannot: {site.problem}"
            )

    def problem(self, config: LighthouseConfig, n: int) -> str | None:
        return context_parallel.chunk_problem(config, n)

    def lighthouse(self, site: SdpaSite, args: dict[str, Any], config: LighthouseConfig, rotary: Rotary | None
                   ) -> fx.Proxy:
        return context_parallel.lighthouse_stages_cp(args["query"], args["key"], args["value"], n=site.q_shape[2],
                                                     group_name=self.group.group_name, scale=args.get("scale"),
                                                     config=config, rotary=rotary)

    def dense(self, site: SdpaSite, args: dict[str, Any]) -> fx.Proxy | None:
        return context_parallel.dense_stages_cp(args["query"], args["key"], args["value"],
                                                gqa_groups=site.q_shape[1] // site.k_shape[1],
                                                group_name=self.group.group_name, scale=args.get("scale"))
