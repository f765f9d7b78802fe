"""A torchtitan config registry for the two-stage Lighthouse recipe on llama3 (torchtitan 0.3.0).

Stage 1 trains with Lighthouse attention per document (torchtitan's own FlexAttention and its block-causal document
mask, rewritten by the pass), stage 2 resumes stage 1's checkpoint (same folder, optimizer state included) with
torchtitan's stock dense attention; the baseline is the stock model from scratch. Launch with torchtitan's own
entry point, this folder on PYTHONPATH:

    PYTHONPATH=examples/torchtitan torchrun --nproc-per-node 8 -m torchtitan.train \\
        --module lighthouse_llama3 --config llama3_8b_lighthouse          # stage 1: steps 0 .. 70%
    PYTHONPATH=examples/torchtitan torchrun --nproc-per-node 8 -m torchtitan.train \\
        --module lighthouse_llama3 --config llama3_8b_recovery            # stage 2: resumes, dense to 100%
    PYTHONPATH=examples/torchtitan torchrun --nproc-per-node 8 -m torchtitan.train \\
        --module lighthouse_llama3 --config llama3_8b_dense               # baseline: dense from scratch

Each 8B config starts from torchtitan's own llama3 config and changes the model spec (see
``lhcompile.integrations.torchtitan``), the context length, the step budget and the dump folder only; data,
tokenizer, optimizer, activation checkpointing and parallelism stay torchtitan's (override them on the command
line as usual, e.g. ``--dataloader.dataset``, ``--hf_assets_path``).

``llama3_{debugmodel,100m}_{flex,varlen}_{lighthouse,dense}`` need no hub: torchtitan's debug model (6 layers,
d_model 256, 16 heads of 16) or a ~100M model built the same way (12 layers, d_model 768, 6 heads of 128), with
torchtitan's FlexAttention or varlen attention (its block-causal document masks), at 32K context by default
(``--training.seq_len`` to change it) on one GPU, fed the byte-level tokenizer and the ``local_files`` dataset of
``offline_data`` (every stdlib source file a document). ``throughput.py`` runs such pairs and prints tokens/s,
peak memory and loss. ``llama3_debugmodel_cpu_lighthouse`` runs on a CPU (``--training.seq_len`` 2048 or more, k128
in tiles of 32): torchtitan's varlen attention with every layer Lighthouse per document (neither FlexAttention,
which has no CPU backward, nor varlen, which has no CPU kernel, can stay dense there).
"""

from __future__ import annotations

import dataclasses

from offline_data import LOCAL_FILES, byte_tokenizer, register_local_files
from torchtitan.models.llama3 import config_registry, model_registry
from torchtitan.trainer import Trainer

from lhcompile import LighthouseConfig
from lhcompile.integrations.torchtitan import dense, lighthouse

register_local_files()

SEQ_LEN = 32768
STEPS = 10000
RECOVERY = 0.3
LIGHTHOUSE = LighthouseConfig(levels=3, pooling_factor=4, topk=1536, dense_layers=(0, 1, -2, -1))


def _configured(base: Trainer.Config, spec, *, steps: int, folder: str) -> Trainer.Config:
    base.model_spec = spec
    base.training.seq_len = SEQ_LEN
    base.training.steps = steps
    base.compile.enable = True  # the pass captures the model with Dynamo; Inductor then compiles it
    base.checkpoint.enable = True  # stage 2 resumes stage 1's last checkpoint from the same folder
    base.checkpoint.last_save_model_only = False  # with the optimizer state
    base.dump_folder = folder
    return base


def _stage1_steps() -> int:
    return round(STEPS * (1 - RECOVERY))


def llama3_8b_lighthouse() -> Trainer.Config:
    config = _configured(config_registry.llama3_8b(), lighthouse(model_registry("8B"), LIGHTHOUSE),
                         steps=_stage1_steps(), folder="./outputs/lighthouse")
    config.training.disable_cuda_graphs = True  # Lighthouse per document finds each batch's documents on the host
    return config


def llama3_8b_recovery() -> Trainer.Config:
    # the same dump folder: torchtitan resumes from stage 1's last checkpoint and trains on, dense
    return _configured(config_registry.llama3_8b(), dense(model_registry("8B")), steps=STEPS,
                       folder="./outputs/lighthouse")


def llama3_8b_dense() -> Trainer.Config:
    return _configured(config_registry.llama3_8b(), dense(model_registry("8B")), steps=STEPS,
                       folder="./outputs/dense")


# Lighthouse in 4 of the debug model's 6 layers and 10 of the ~100M model's 12; L3 p4, k=512 in tiles of 128 (S/N
# 18.75% at 32K, 9.4% at 128K); documents of at least 16 * 512 = 8192 tokens get Lighthouse
DEBUG_LIGHTHOUSE = LighthouseConfig(levels=3, pooling_factor=4, topk=512, tile_budget=128, dense_layers=(0, -1))


def _model_100m(attn_backend: str):
    """~100M parameters, torchtitan's llama3 built as its own flavors are (12 layers, d_model 768, 6 heads of 128,
    byte-sized vocabulary of the debug model)."""
    from torchtitan.models.llama3 import _build_llama3_layers, compute_ffn_hidden_dim, llama3_configs

    config = llama3_configs["debugmodel"](attn_backend=attn_backend)
    rope = dataclasses.replace(config.layers[0].attention.rope, dim=128)
    dim, heads = 768, 6
    layers = _build_llama3_layers(fuse_qkv=True, n_layers=12, dim=dim, n_heads=heads,
                                  hidden_dim=compute_ffn_hidden_dim(dim, multiple_of=256), rope=rope,
                                  attn_backend=attn_backend)
    return dataclasses.replace(
        config, dim=dim, layers=layers, tok_embeddings=dataclasses.replace(config.tok_embeddings, embedding_dim=dim),
        norm=dataclasses.replace(config.norm, normalized_shape=dim),
        lm_head=dataclasses.replace(config.lm_head, in_features=dim))


def _spec(size: str, attn_backend: str):
    spec = model_registry("debugmodel", attn_backend=attn_backend)
    return spec if size == "debugmodel" else dataclasses.replace(spec, model=_model_100m(attn_backend))


def _offline(spec, folder: str) -> Trainer.Config:
    # torchtitan's debug config with its plain cross-entropy: the chunked loss of its default debug config failed in
    # backward on the GPU machine's torch 2.11 ("data is not allocated yet"), and a small vocabulary needs no chunks
    config = _configured(config_registry.llama3_debugmodel_ce_loss(), spec, steps=20, folder=folder)
    config.training.local_batch_size = 1
    config.checkpoint.enable = False  # a throughput run: nothing to resume
    config.validator.enable = False
    config.dataloader.dataset = LOCAL_FILES
    config.hf_assets_path = byte_tokenizer(f"{folder}/byte_tokenizer")
    return config


def _register(size: str, attn_backend: str) -> None:
    name = f"llama3_{size}_{attn_backend}"

    def lighthouse_config(scorer: str = "norm") -> Trainer.Config:
        chosen = dataclasses.replace(DEBUG_LIGHTHOUSE, scorer=scorer)
        suffix = "" if scorer == "norm" else f"_{scorer}"
        config = _offline(lighthouse(_spec(size, attn_backend), chosen), f"./outputs/{name}_lighthouse{suffix}")
        config.training.disable_cuda_graphs = True  # Lighthouse per document finds each batch's documents on the host
        return config

    def dilated_config() -> Trainer.Config:  # the paper's dilated scorer (δ=4), for its retrieval
        return lighthouse_config("dilated")

    def dense_config() -> Trainer.Config:
        return _offline(dense(_spec(size, attn_backend)), f"./outputs/{name}_dense")

    globals()[f"{name}_lighthouse"], globals()[f"{name}_dense"] = lighthouse_config, dense_config
    globals()[f"{name}_lighthouse_dilated"] = dilated_config


for _size in ("debugmodel", "100m"):
    for _attention in ("flex", "varlen"):
        _register(_size, _attention)


def llama3_debugmodel_cpu_lighthouse() -> Trainer.Config:
    # a quarter of the GPU configs' top-k and tiles: Lighthouse from 2048 tokens, so that rows of 2048 train in
    # seconds where the CPU's attention on 8192-token documents took minutes per step
    every = dataclasses.replace(DEBUG_LIGHTHOUSE, topk=128, tile_budget=32, dense_layers=())
    config = _offline(lighthouse(_spec("debugmodel", "varlen"), every), "./outputs/debug_cpu_lighthouse")
    config.training.disable_cuda_graphs = True
    return config
