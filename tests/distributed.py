"""Running a test body on 2 processes (gloo on CPU, NCCL on GPUs), and what those bodies share."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def spawn(worker, tmp_path, *args, backend="gloo"):
    mp.spawn(_run, args=(worker, str(tmp_path / "store"), backend, args), nprocs=WORLD, join=True)


def _run(rank, worker, store, backend, args):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        worker(rank, *args)
        torch._dynamo.reset()  # compiled code's guards hold the model, its DTensors and their pending work
        dist.barrier()  # neither rank tears its group down while the other still has messages in flight
    finally:
        dist.destroy_process_group()
    # The body passed. Leave without interpreter finalization: gloo's C++ threads can still hold tensors then,
    # and freeing them in a half torn-down interpreter aborts the process (SIGABRT, "terminate called without an
    # active exception"; pytorch/pytorch#179291), which once failed a passing test in CI
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shard_with_fsdp2(model, parts):
    """fully_shard each of parts, then the root, over all ranks (parts=[]: the root only)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(next(model.parameters()).device.type, (WORLD,))
    for part in parts:
        fully_shard(part, mesh=mesh)
    fully_shard(model, mesh=mesh)


def close(mine, want, what, tol=1e-5):
    err = ((mine.double() - want.double()).norm() / want.double().norm()).item()
    assert err < tol, f"{what}: relative error {err:.2e}"
