"""Lighthouse attention on a sequence sharded across ranks by PyTorch's context parallelism.

PyTorch's context parallelism (``torch.distributed.tensor.experimental.context_parallel``) cuts a sequence of
N tokens into 2W chunks of c = N / 2W and, with its head-tail load balancer, gives rank r the chunks r and
2W-1-r, concatenated. Lighthouse then runs per chunk, with no communication: pyramid, scores and selection
on the chunk alone with half the top-k budget (each chunk holds whole coarsest windows), gather, and a local
scatter whose causal shift is clipped at the chunk's end. Only the dense attention over the gathered
sub-sequences crosses ranks: every rank's gathered sequence is again [chunk r | chunk 2W-1-r] with two equal
halves, and chunks' entries are ordered by position, so PyTorch's own load-balanced ring attention over them
is exactly causal attention over the concatenation of all chunks' gathered sub-sequences.

``cp_reference`` computes the same on one device from the whole sequence; the distributed version equals it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor.experimental._context_parallel import _attention as _cp

from ..config import LighthouseConfig
from . import lighthouse
from .attention import check_sdpa_inputs
from .scorers import SCORERS
from .rotary import Rotary


def chunk_problem(config: LighthouseConfig, local_len: int) -> str | None:
    """Why a rank's shard of local_len tokens (two chunks) cannot run Lighthouse, or None if it can."""
    half = chunk_config(config)
    chunk = local_len // 2
    if local_len % 2 or chunk < half.min_lighthouse_len or half.padded_len(chunk) != chunk:
        return (f"a context-parallel chunk of {local_len / 2:g} tokens cannot hold the tiles of topk/2={half.topk} "
                f"(it needs at least {half.min_lighthouse_len} tokens and a multiple of {half.padded_len(1)})")
    return None


def chunk_config(config: LighthouseConfig) -> LighthouseConfig:
    """The per-chunk configuration: a rank's two chunks share the top-k budget, and each chunk is scored on its own
    (so only a scorer that reads one token at a time gives the single-device scores)."""
    scorer = SCORERS[config.scorer]
    if not scorer.context_parallel:
        raise ValueError(
            f"context parallelism scores each rank's chunks on their own, which changes what scorer="
            f"{config.scorer!r} computes ({scorer.description.split(':')[0]} reads across the whole sequence); use "
            "scorer='norm' under context parallelism, or train on one device")
    if config.topk % (2 * config.tile_budget):
        raise ValueError(
            f"context parallelism splits topk={config.topk} between a rank's two chunks: it must be a multiple of "
            f"2 * tile_budget = {2 * config.tile_budget}"
        )
    return dataclasses.replace(config, topk=config.topk // 2)


def cp_reference(q: Tensor, k: Tensor, v: Tensor, config: LighthouseConfig, world_size: int,
                 *, scale: float | None = None, rope: Rotary | None = None) -> Tensor:
    """Single-device meaning of ``lighthouse_attention_cp`` on W = world_size ranks, from the whole sequence (with
    ``rope``, the whole sequence's tables and unrotated q, k)."""
    chunks = 2 * world_size
    problem = chunk_problem(config, 2 * q.shape[2] // chunks)
    if problem:
        raise ValueError(problem)
    return lighthouse.chunked_stages(
        q, k, v, chunks=chunks, chunk_len=q.shape[2] // chunks, config=chunk_config(config), rotary=rope,
        attention=lambda qg, kg, vg: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale),
    )


@contextlib.contextmanager
def _head_tail_layout():
    """PyTorch's ring reads its load-balancing switch from a module option; our shards are head-tail."""
    before = _cp._cp_options.enable_load_balance
    _cp._cp_options.enable_load_balance = True
    try:
        yield
    finally:
        _cp._cp_options.enable_load_balance = before


@torch.library.custom_op("lhcompile::ring_attention", mutates_args=())
def ring_attention(q: Tensor, k: Tensor, v: Tensor, group_name: str, scale: float | None) -> tuple[Tensor, Tensor]:
    """Causal attention of this rank's [chunk r | chunk 2W-1-r] over all ranks' chunks (PyTorch's ring
    attention with head-tail load balancing): returns the output and its log-sum-exp."""
    group = dist.distributed_c10d._resolve_process_group(group_name)
    cuda = q.device.type == "cuda"
    op = torch.ops.aten._scaled_dot_product_flash_attention if cuda else torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with _head_tail_layout():
        out, lse, *_ = _cp._templated_ring_attention(
            group, 2, op, query=q, key=k, value=v, is_causal=True, dropout_p=0.0, scale=scale
        )
    return out.to(q.dtype).contiguous(), lse.contiguous()


@ring_attention.register_fake
def _(q, k, v, group_name, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _ring_setup(ctx, inputs, output) -> None:
    q, k, v, ctx.group_name, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)


def _ring_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    group = dist.distributed_c10d._resolve_process_group(ctx.group_name)
    if q.device.type == "cuda":
        op = torch.ops.aten._scaled_dot_product_flash_attention_backward.default
        # dense (not nested) inputs: no cumulative lengths, as the forward returns; no dropout: philox unread
        philox = q.new_zeros((), dtype=torch.int64)
        extra = dict(cum_seq_q=None, cum_seq_k=None, max_q=q.shape[2], max_k=k.shape[2], philox_seed=philox,
                     philox_offset=philox)
    else:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
        extra = {}
    with _head_tail_layout():
        dq, dk, dv, *_ = _cp._templated_ring_attention_backward(
            group, 2, op, grad_out=grad_out, grad_out_name="grad_out", query=q, key=k, value=v, out=out,
            logsumexp=lse, is_causal=True, dropout_p=0.0, scale=ctx.scale, **extra,
        )
    return dq, dk, dv, None, None


ring_attention.register_autograd(_ring_backward, setup_context=_ring_setup)


def dense_stages_cp(q: Tensor, k: Tensor, v: Tensor, *, gqa_groups: int, group_name: str, scale: float | None
                    ) -> Tensor:
    """Dense causal attention of this rank's shard over the whole sequence (for the sites kept dense)."""
    if gqa_groups > 1:  # the ring's per-step kernels want one kv head per query head
        k, v = (t.repeat_interleave(gqa_groups, dim=1) for t in (k, v))
    return ring_attention(q, k, v, group_name, scale)[0]


def lighthouse_stages_cp(q: Tensor, k: Tensor, v: Tensor, *, n: int, group_name: str, scale: float | None,
                         config: LighthouseConfig, rotary: Rotary | None = None, alone: bool = False) -> Tensor:
    """The traceable body of ``lighthouse_attention_cp`` for a shard of known length n. ``rotary``'s rows are the
    shard's own: [chunk r | chunk 2W-1-r], at their global positions (as RoPE computed from sharded position ids
    or a sharded table gives them), so chunk 1's rows start at n / 2. ``alone`` (a group of one rank): the two
    chunks' gathered entries attend locally, with no collective."""
    def attention(qg: Tensor, kg: Tensor, vg: Tensor) -> Tensor:
        if alone:
            return F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
        return ring_attention(qg, kg, vg, group_name, scale)[0]

    return lighthouse.chunked_stages(q, k, v, chunks=2, chunk_len=n // 2, config=chunk_config(config), rotary=rotary,
                              attention=attention)


def lighthouse_attention_cp(q: Tensor, k: Tensor, v: Tensor, config: LighthouseConfig, group: dist.ProcessGroup,
                            *, scale: float | None = None, rope: Rotary | None = None) -> Tensor:
    """Lighthouse attention of this rank's shard, (B, H, 2c, d) = [chunk r | chunk 2W-1-r] as ``shard`` cuts it.

    Equals ``shard(cp_reference(whole q, k, v, config, W), r, W)`` (tested). q may have more heads than k/v
    (GQA); the gathered k/v are per query head, as in the single-device operator.
    """
    check_sdpa_inputs(q, k, v, is_causal=True)
    problem = chunk_problem(config, q.shape[2])
    if problem:
        raise ValueError(problem)
    Rotary.check_for(rope, config.rope, q, "lighthouse_attention_cp")
    return lighthouse_stages_cp(q, k, v, n=q.shape[2], group_name=group.group_name, scale=scale, config=config,
                                rotary=rope)
