"""Context parallelism on 2 CPU processes (gloo): the sharded result equals the single-device reference."""

from __future__ import annotations

import copy
import dataclasses
import importlib

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lhcompile
from lhcompile import LighthouseWarning, LighthouseConfig, Rotary, lighthouse_attention
from lhcompile.context_parallel import shard
from lhcompile.operator.context_parallel import cp_reference, lighthouse_attention_cp
from tests.distributed import WORLD, close, shard_with_fsdp2, spawn
from tests.conftest import Recorder
from tests.models import VOCAB, EmbeddingAttentionLM, RopeMoved, SdpaAt, hf_model, hf_rotation, logits

CFG = LighthouseConfig(levels=2, pooling_factor=2, topk=16, tile_budget=4, dense_layers=(0, -1))
GPU_CFG = dataclasses.replace(CFG, dense_layers=(-1,))
N = 128  # 4 chunks of 32 tokens


def _operator(rank, dtype, device="cpu", tol=1e-5, rope=False):
    make = lambda *shape: torch.randn(*shape).to(device, dtype)  # noqa: E731  (same values on every rank)
    q, k, v = (make(2, heads, N, 8).requires_grad_() for heads in (4, 2, 2))
    grad = make(2, 4, N, 8)
    # RoPE after selection: the whole sequence's tables there, each rank's rows of them here (as sharded position
    # ids give them), so chunk 2W-1-r is rotated at its global positions
    angles = torch.arange(N).float().unsqueeze(-1) / 10.0 ** torch.arange(8).float()
    tables = (angles.cos().to(device, dtype), angles.sin().to(device, dtype)) if rope else None
    rotary = Rotary.of("rotate_half", *tables) if rope else None
    local_rotary = Rotary.of("rotate_half", *(shard(t, rank, WORLD, dim=0) for t in tables)) if rope else None
    want = cp_reference(q, k, v, CFG, WORLD, scale=0.3, rope=rotary)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    local = [shard(t.detach(), rank, WORLD).requires_grad_() for t in (q, k, v)]
    out = lighthouse_attention_cp(*local, CFG, dist.group.WORLD, scale=0.3, rope=local_rotary)
    grads = torch.autograd.grad(out, local, shard(grad, rank, WORLD))
    close(out, shard(want, rank, WORLD), "out", tol)
    for name, mine, ref in zip("qkv", grads, want_grads):
        close(mine, shard(ref, rank, WORLD), f"d{name}", tol)


@pytest.mark.parametrize("rope", [False, True], ids=["rope-before-pooling", "rope-after-selection"])
def test_operator_on_two_ranks_equals_single_device_reference(tmp_path, rope):
    spawn(_operator, tmp_path, torch.float32, "cpu", 1e-5, rope)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_operator_on_two_gpus_equals_single_device_reference(tmp_path):
    # the Triton kernels per chunk and PyTorch's ring over NCCL with its CUDA flash kernels, in bf16
    spawn(_operator, tmp_path, torch.bfloat16, "cuda", 2e-2, backend="nccl")


def _model(rank, compiler, per_layer, gpu=False, checkpointing=False, rope=False):
    if gpu:
        # bf16, which the CUDA ring needs, and selection on the embeddings: a selection downstream of arithmetic
        # flips with bf16 rounding (in a 4-layer Llama, running the reference's dense layers with the math
        # instead of the flash kernel alone moves the logits by 8%), and Inductor rounds differently from eager
        device, dtype, tol, config = "cuda", torch.bfloat16, 3e-2, GPU_CFG
        model, stack, paths, lighthouse = EmbeddingAttentionLM(), "blocks", ["blocks.0", "blocks.1"], [0]
    else:
        device, dtype, tol, config = "cpu", torch.float32, 1e-5, CFG
        model, stack, lighthouse = hf_model("llama", attention="causal_sdpa"), "model.layers", [1, 2]
        paths = [f"model.layers.{i}.self_attn" for i in range(4)]  # causal_sdpa: masks from global positions
    model = model.to(device, dtype)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, N + 1), device=device)
    inputs, labels, positions = ids[:, :-1], ids[:, 1:], torch.arange(N, device=device).expand(2, -1)

    def run(m, inputs, positions):
        return logits(m, inputs) if gpu else m(input_ids=inputs, position_ids=positions).logits

    # the model's own code on the whole sequence, Lighthouse sites as cp_reference: what the shards must give
    if rope:  # RoPE after selection: cp_reference on the unrotated q and k with the whole sequence's tables
        config = dataclasses.replace(config, rope="after_selection")
        site = lambda q, k, v, scale, rotate, tables: cp_reference(  # noqa: E731
            q, k, v, config, WORLD, scale=scale, rope=Rotary.of("rotate_half", *tables))
        attention = RopeMoved(importlib.import_module(type(twin).__module__), "apply_rotary_pos_emb",
                              lambda cos, sin, *_: (cos, sin), hf_rotation("llama"), dict.fromkeys(lighthouse, site))
    else:
        attention = SdpaAt(set(lighthouse), lambda q, k, v, scale: cp_reference(q, k, v, config, WORLD, scale=scale))
    with attention:
        want = run(twin, inputs, positions)
    F.cross_entropy(want.flatten(0, 1).float(), labels.flatten()).backward()

    if checkpointing:  # each layer recomputed in the backward pass, Lighthouse selection included
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard_with_fsdp2(model, model.get_submodule(stack) if per_layer else [])  # per layer: torchtitan's wrapping
    lhcompile.apply(model, config, compiler=compiler, context_parallel=dist.group.WORLD)
    local = run(model, shard(inputs, rank, WORLD, dim=1), shard(positions, rank, WORLD, dim=1))
    F.cross_entropy(local.flatten(0, 1).float(), shard(labels, rank, WORLD, dim=1).flatten()).backward()

    report = lhcompile.inspect(model)
    assert sorted(s.module_path for s in report.rewritten) == [paths[i] for i in lighthouse], str(report)
    assert all(("RoPE after selection" in s.reason) == rope for s in report.rewritten), str(report)
    assert sorted(s.module_path for s in report.dense) == [p for i, p in enumerate(paths) if i not in lighthouse]
    close(local, shard(want, rank, WORLD, dim=1), "logits", tol)
    for (name, p), (_, p_ref) in zip(model.named_parameters(), twin.named_parameters()):
        close(p.grad.full_tensor(), p_ref.grad, f"grad of {name}", tol)


# Inductor with per-layer FSDP2 only (torchtitan's wrapping): root wrapping under Inductor adds a minute of CPU
# compilation and nothing the other three cases do not check
@pytest.mark.parametrize("compiler,per_layer,checkpointing,rope",
                         [("eager", False, False, False), ("eager", True, False, False),
                          ("inductor", True, False, False), ("eager", True, True, True)],
                         ids=["fsdp-root-eager", "fsdp-per-layer-eager", "fsdp-per-layer-inductor",
                              "fsdp-per-layer-checkpointed-eager-rope-after-selection"])
def test_hf_llama_with_fsdp2_and_context_parallel_equals_single_device_reference(tmp_path, compiler, per_layer,
                                                                                checkpointing, rope):
    spawn(_model, tmp_path, compiler, per_layer, False, checkpointing, rope)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("per_layer", [False, True], ids=["fsdp-root", "fsdp-per-layer"])
def test_hf_llama_on_two_gpus_equals_single_device_reference(tmp_path, compiler, per_layer):
    # Triton kernels, NCCL, PyTorch's CUDA ring attention and Inductor, in bf16 (which the CUDA ring needs)
    spawn(_model, tmp_path, compiler, per_layer, True, backend="nccl")


def _per_layer_fsdp(rank, part):
    model = hf_model("llama", attention="causal_sdpa")  # a layer compiled alone cannot prove an input mask causal
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, N))  # the same batch on both ranks: FSDP's averaged gradients are its own
    with SdpaAt({1}, lambda q, k, v, scale: lighthouse_attention(q, k, v, CFG, scale=scale)):
        want = twin(input_ids=ids).logits
    want.square().mean().backward()

    shard_with_fsdp2(model, [layer.get_submodule(part) for layer in model.model.layers])
    lhcompile.apply(model, CFG, compiler="eager", filter_fn=lambda path: path != "model.layers.2.self_attn")
    got = model(input_ids=ids).logits
    got.square().mean().backward()
    close(got, want, "logits")
    for (name, p), (_, p_ref) in zip(model.named_parameters(), twin.named_parameters()):
        close(p.grad.full_tensor(), p_ref.grad, f"grad of {name}")
    fates = {s.module_path: s.reason for s in lhcompile.inspect(model).sites}
    assert fates == {
        "model.layers.0.self_attn": "dense layer (site 0 of 4 is in dense_layers=(0, -1))",
        # the model's own code asked transformers for the mask eagerly: one document per row, plain Lighthouse
        "model.layers.1.self_attn": "lighthouse",
        "model.layers.2.self_attn": "excluded by filter_fn",
        "model.layers.3.self_attn": "dense layer (site 3 of 4 is in dense_layers=(0, -1))",
    }, str(lhcompile.inspect(model))

    with torch.no_grad():
        dense = twin(input_ids=ids).logits
        close(model.eval()(input_ids=ids).logits, dense, "logits in eval mode")
        model.train()
        lhcompile.restore(model)
        close(model(input_ids=ids).logits, dense, "logits after restore")


@pytest.mark.parametrize("part", ["", "self_attn"], ids=["layers", "attention-modules"])
def test_per_layer_fsdp2_compiles_each_kind_of_layer_with_its_own_decision(tmp_path, part):
    # Dynamo compiles each fully_shard-ed module on its own and reuses one graph for all modules of a class
    spawn(_per_layer_fsdp, tmp_path, part)


def _sub_layer_fsdp(rank):
    model = hf_model("llama")
    shard_with_fsdp2(model, [model.model])  # compiled on its own: Dynamo traces it from its own frame
    lhcompile.apply(model, CFG, compiler="eager", regional=False)  # by layer, the layers are compiled on their own
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        model(input_ids=torch.randint(0, VOCAB, (2, N)))
    # its graph's sites still take their places in the model: paths and dense_layers as the model has them
    assert [(s.module_path, s.rewritten) for s in lhcompile.inspect(model)] == [
        (f"model.layers.{i}.self_attn", i in (1, 2)) for i in range(4)], str(lhcompile.inspect(model))


def test_sharding_outside_the_layer_stack_keeps_the_models_sites(tmp_path):
    spawn(_sub_layer_fsdp, tmp_path)


def test_a_group_of_one_rank_runs_without_a_collective_and_a_too_large_ring_exchange_is_refused(tmp_path):
    # torchrun --nproc-per-node 1 (CP=1): the shard is the whole sequence in order, so attention is local; a
    # dense site whose keys and values reach 2^31 elements would otherwise crash NCCL's all-to-all at 1M tokens
    from lhcompile.rewrite.placements import ContextParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = hf_model("llama", attention="causal_sdpa")
        twin = copy.deepcopy(model)
        graphs = Recorder()
        lhcompile.apply(model, CFG, compiler=graphs, context_parallel=dist.group.WORLD)
        ids, positions = torch.randint(0, VOCAB, (2, N)), torch.arange(N).expand(2, -1)
        got = model(input_ids=ids, position_ids=positions).logits
        with SdpaAt({1, 2}, lambda q, k, v, scale: cp_reference(q, k, v, CFG, 1, scale=scale)):
            want = twin(input_ids=ids, position_ids=positions).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not [n for g in graphs for n in g.graph.nodes if "ring_attention" in str(n.target)]

        class Site:  # a dense site of one shard at 1M tokens, 8 heads of 128 (the shapes of the crash)
            index, module_path, q_shape, k_shape = 0, "layers.0", (1, 8, 1 << 20, 128), (1, 8, 1 << 20, 128)

        two = ContextParallel(type("Pair", (), {"size": lambda self: 2})())  # a group of two ranks, by its size
        with pytest.raises(ValueError, match="would exchange 2147483648 elements .* fewer than 2\\^31"):
            two.dense(Site(), lhcompile.rewrite.placements.Inputs(None, None, None, None, None, 1, 1 << 20))
    finally:
        dist.destroy_process_group()
