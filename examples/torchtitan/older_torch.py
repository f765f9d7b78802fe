"""torchtitan 0.3.0's own ``torchtitan.train`` on a torch older than the one it targets, for benchmarks (the GPU
machine here has torch 2.11): names it uses that the older torch lacks get their older equivalents before
torchtitan is imported. Nothing of the model, the trainer or lhcompile changes.

    torchrun --nproc-per-node 1 examples/torchtitan/older_torch.py --module lighthouse_llama3 --config NAME ...

What is shimmed, only where the running torch lacks it:

- ``torch.distributed.fsdp.DataParallelMeshDims`` (torch 2.13): torchtitan imports it at module level for its FSDP
  helpers; a plain (shard, replicate) record stands in. On one GPU nothing is sharded, so it is never passed on.
- ``torch.distributed.set_timeout`` (torch 2.14): torchtitan calls it after the first step to lower the
  process-group timeout; ``distributed_c10d._set_pg_timeout`` does the same in older releases.
- ``create_block_mask(..., separate_full_blocks=True)`` (torch 2.13): torchtitan asks for what older releases
  always do (fully unmasked blocks kept apart from partial ones), so the argument is dropped there; ``False``
  (its batch-invariant mode) cannot be had and is refused.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch.distributed as dist
import torch.distributed.fsdp as fsdp


def install() -> list[str]:
    """Install the shims this torch needs; returns their names."""
    shimmed = []
    if not hasattr(fsdp, "DataParallelMeshDims"):
        @dataclass(frozen=True)
        class DataParallelMeshDims:
            shard: object = None
            replicate: object = None

        fsdp.DataParallelMeshDims = DataParallelMeshDims
        shimmed.append("torch.distributed.fsdp.DataParallelMeshDims")
    if not hasattr(dist, "set_timeout"):
        from torch.distributed.distributed_c10d import _set_pg_timeout

        dist.set_timeout = lambda timeout, group=None: _set_pg_timeout(timeout, group)
        shimmed.append("torch.distributed.set_timeout")
    from torch.nn.attention import flex_attention

    if "separate_full_blocks" not in inspect.signature(flex_attention.create_block_mask).parameters:
        create_block_mask = flex_attention.create_block_mask

        @functools.wraps(create_block_mask)
        def create_block_mask_separating_full_blocks(*args, separate_full_blocks: bool = True, **kwargs):
            if not separate_full_blocks:
                raise NotImplementedError("older_torch: this torch's create_block_mask always separates full blocks; "
                                          "torchtitan's batch-invariant mode needs torch >= 2.13")
            return create_block_mask(*args, **kwargs)

        flex_attention.create_block_mask = create_block_mask_separating_full_blocks
        shimmed.append("create_block_mask(separate_full_blocks=True)")
    return shimmed


def main() -> None:
    shimmed = install()
    print(f"older_torch: shimmed {', '.join(shimmed) or 'nothing'}", flush=True)
    from torchtitan.train import main as train

    train()


if __name__ == "__main__":
    main()
