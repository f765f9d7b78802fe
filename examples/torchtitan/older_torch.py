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
- ``varlen_attn(..., num_splits=, enable_gqa=)`` (torch 2.12): torchtitan's ``VarlenAttention`` passes
  ``num_splits=1`` (one split of the keys, so no split-k reduction) where older releases take no such argument and
  never split a training call's keys either; it is dropped there. ``enable_gqa=True`` cannot be had and is refused.
- FlashAttention 3 / 4 where their packages are absent: torchtitan's ``VarlenAttention`` activates FA3 on Hopper
  and FA4 on Blackwell (``get_cuda_flash_attention_impl``), which imports ``flash_attn_interface`` /
  ``flash_attn.cute.interface``. Where that package is missing the choice becomes None, so PyTorch's own flash
  kernels run, as they do for torchtitan on older GPUs.
"""

from __future__ import annotations

import functools
import importlib.util
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
    shimmed += _varlen_arguments()
    shimmed += _flash_attention_packages()
    return shimmed


def _varlen_arguments() -> list[str]:
    from torch.nn.attention import varlen

    missing = {"num_splits", "enable_gqa"} - set(inspect.signature(varlen.varlen_attn).parameters)
    if not missing:
        return []
    varlen_attn = varlen.varlen_attn

    @functools.wraps(varlen_attn)
    def varlen_attn_without_newer_arguments(*args, **kwargs):
        if "num_splits" in missing and kwargs.pop("num_splits", None) not in (None, 1):
            raise NotImplementedError("older_torch: this torch's varlen_attn cannot split keys on request")
        if "enable_gqa" in missing and kwargs.pop("enable_gqa", False):
            raise NotImplementedError("older_torch: this torch's varlen_attn has no grouped-query attention")
        return varlen_attn(*args, **kwargs)

    varlen.varlen_attn = varlen_attn_without_newer_arguments
    return [f"varlen_attn({', '.join(sorted(missing))})"]


def _flash_attention_packages() -> list[str]:
    """Only where torchtitan would pick an implementation whose package is missing."""
    import torch
    from torchtitan.tools import utils

    chosen = utils.get_cuda_flash_attention_impl() if torch.cuda.is_available() else None
    package = {"FA3": "flash_attn_interface", "FA4": "flash_attn.cute.interface"}.get(chosen)
    if package is None or _importable(package):
        return []
    utils.get_cuda_flash_attention_impl = lambda: None
    return [f"get_cuda_flash_attention_impl() -> None ({chosen}: no {package})"]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def main() -> None:
    shimmed = install()
    print(f"older_torch: shimmed {', '.join(shimmed) or 'nothing'}", flush=True)
    from torchtitan.train import main as train

    train()


if __name__ == "__main__":
    main()
