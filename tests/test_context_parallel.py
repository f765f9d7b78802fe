"""Context parallelism on 2 CPU processes (gloo): the sharded result equals the single-device reference."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import lhcompile
from lhcompile import LighthouseConfig
from lhcompile.context_parallel import cp_reference, lighthouse_attention_cp, shard
from tests.models import VOCAB, SdpaAt, hf_model

WORLD = 2
CFG = LighthouseConfig(levels=2, pooling_factor=2, topk=16, tile_budget=4, dense_layers=(0, -1))
N = 128  # 4 chunks of 32 tokens


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
    finally:
        dist.destroy_process_group()


def close(mine, want, what, tol=1e-5):
    err = ((mine.double() - want.double()).norm() / want.double().norm()).item()
    assert err < tol, f"{what}: relative error {err:.2e}"


def _operator(rank, dtype, device="cpu", tol=1e-5):
    make = lambda *shape: torch.randn(*shape).to(device, dtype)  # noqa: E731  (same values on every rank)
    q, k, v = (make(2, heads, N, 8).requires_grad_() for heads in (4, 2, 2))
    grad = make(2, 4, N, 8)
    want = cp_reference(q, k, v, CFG, WORLD, scale=0.3)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    local = [shard(t.detach(), rank, WORLD).requires_grad_() for t in (q, k, v)]
    out = lighthouse_attention_cp(*local, CFG, dist.group.WORLD, scale=0.3)
    grads = torch.autograd.grad(out, local, shard(grad, rank, WORLD))
    close(out, shard(want, rank, WORLD), "out", tol)
    for name, mine, ref in zip("qkv", grads, want_grads):
        close(mine, shard(ref, rank, WORLD), f"d{name}", tol)


def test_operator_on_two_ranks_equals_single_device_reference(tmp_path):
    spawn(_operator, tmp_path, torch.float32)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_operator_on_two_gpus_equals_single_device_reference(tmp_path):
    # the Triton kernels per chunk and PyTorch's ring over NCCL with its CUDA flash kernels, in bf16
    spawn(_operator, tmp_path, torch.bfloat16, "cuda", 2e-2, backend="nccl")


def _model(rank, compiler):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = hf_model("llama", attention="causal_sdpa")  # lhcompile/hf.py: masks from global position_ids
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, N + 1))
    inputs, labels, positions = ids[:, :-1], ids[:, 1:], torch.arange(N).expand(2, -1)

    # the model's own code on the whole sequence, Lighthouse sites as cp_reference: what the shards must give
    with SdpaAt({1, 2}, lambda q, k, v, scale: cp_reference(q, k, v, CFG, WORLD, scale=scale)):
        want = twin(input_ids=inputs, position_ids=positions).logits
    F.cross_entropy(want.flatten(0, 1), labels.flatten()).backward()

    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    lhcompile.apply(model, CFG, compiler=compiler, context_parallel=dist.group.WORLD)
    local = model(input_ids=shard(inputs, rank, WORLD, dim=1), position_ids=shard(positions, rank, WORLD, dim=1)).logits
    F.cross_entropy(local.flatten(0, 1), shard(labels, rank, WORLD, dim=1).flatten()).backward()

    report = lhcompile.inspect(model)
    assert [s.index for s in report.rewritten] == [1, 2], str(report)
    close(local, shard(want, rank, WORLD, dim=1), "logits")
    for (name, p), (_, p_ref) in zip(model.named_parameters(), twin.named_parameters()):
        close(p.grad.full_tensor(), p_ref.grad, f"grad of {name}")


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_hf_llama_with_fsdp2_and_context_parallel_equals_single_device_reference(tmp_path, compiler):
    spawn(_model, tmp_path, compiler)


def _per_layer_fsdp(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = hf_model("llama", attention="causal_sdpa")
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    lhcompile.apply(model, CFG, compiler="eager")
    with pytest.warns(UserWarning, match="captured in a graph of one submodule"):
        model(input_ids=torch.randint(0, VOCAB, (2, N)))


def test_per_layer_fsdp2_wrapping_is_warned_about(tmp_path):
    # Dynamo compiles each fully_shard-ed layer on its own and reuses one graph for all of them
    spawn(_per_layer_fsdp, tmp_path)
