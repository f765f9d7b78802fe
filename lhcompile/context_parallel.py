"""Context parallelism for users: how to cut a batch for the ranks of a context-parallel group.

``lhcompile.apply(model, config, context_parallel=group)`` runs every attention site of the model on sequences
sharded across ``group`` as PyTorch's context parallelism with head-tail load balancing shards them: rank r holds
chunks r and 2W-1-r of 2W (see ``lhcompile.operator.context_parallel``). ``shard`` cuts a whole sequence's per-token
inputs that way.
"""

from __future__ import annotations

import torch
from torch import Tensor


def shard(x: Tensor, rank: int, world_size: int, dim: int = 2) -> Tensor:
    """Rank's part of a whole sequence under PyTorch's head-tail load balancing: chunks r and 2W-1-r.

    Use it (or PyTorch's ``context_parallel(mesh, buffers=...)``) for every per-token input: token ids,
    labels and position ids, so that each rank's RoPE sees global positions.
    """
    parts = x.chunk(2 * world_size, dim=dim)
    return torch.cat([parts[rank], parts[2 * world_size - 1 - rank]], dim=dim)
