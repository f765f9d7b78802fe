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

``llama3_debugmodel_32k_lighthouse`` / ``llama3_debugmodel_32k_dense`` need no hub: torchtitan's debug model
(6 layers, d_model 256, 16 heads of 16) at 32K context on one GPU, fed the byte-level tokenizer and the
``local_files`` dataset of ``offline_data``. ``throughput.py`` runs the pair and prints tokens/s and peak memory.
``llama3_debugmodel_cpu_lighthouse`` runs on a CPU: torchtitan's varlen attention with every layer Lighthouse per
document (neither FlexAttention, which has no CPU backward, nor varlen, which has no CPU kernel, can stay dense
there).
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
    return _configured(config_registry.llama3_8b(), lighthouse(model_registry("8B"), LIGHTHOUSE),
                       steps=_stage1_steps(), folder="./outputs/lighthouse")


def llama3_8b_recovery() -> Trainer.Config:
    # the same dump folder: torchtitan resumes from stage 1's last checkpoint and trains on, dense
    return _configured(config_registry.llama3_8b(), dense(model_registry("8B")), steps=STEPS,
                       folder="./outputs/lighthouse")


def llama3_8b_dense() -> Trainer.Config:
    return _configured(config_registry.llama3_8b(), dense(model_registry("8B")), steps=STEPS,
                       folder="./outputs/dense")


# 4 of the debug model's 6 layers Lighthouse (the paper's (0, 1, -2, -1) would leave 2 of 6); issue 11's 32K
# geometry: L3 p4, k=512 in tiles of 128
DEBUG_LIGHTHOUSE = LighthouseConfig(levels=3, pooling_factor=4, topk=512, tile_budget=128, dense_layers=(0, -1))


def _debug_32k(spec, folder: str) -> Trainer.Config:
    config = _configured(config_registry.llama3_debugmodel(), spec, steps=20, folder=folder)
    config.training.local_batch_size = 2
    config.checkpoint.enable = False  # a throughput run: nothing to resume
    config.validator.enable = False
    config.dataloader.dataset = LOCAL_FILES
    config.hf_assets_path = byte_tokenizer(f"{folder}/byte_tokenizer")
    return config


def llama3_debugmodel_32k_lighthouse() -> Trainer.Config:
    return _debug_32k(lighthouse(model_registry("debugmodel"), DEBUG_LIGHTHOUSE), "./outputs/debug_32k_lighthouse")


def llama3_debugmodel_cpu_lighthouse() -> Trainer.Config:
    every = dataclasses.replace(DEBUG_LIGHTHOUSE, dense_layers=())
    return _debug_32k(lighthouse(model_registry("debugmodel", attn_backend="varlen"), every),
                      "./outputs/debug_cpu_lighthouse")


def llama3_debugmodel_32k_dense() -> Trainer.Config:
    return _debug_32k(dense(model_registry("debugmodel")), "./outputs/debug_32k_dense")
