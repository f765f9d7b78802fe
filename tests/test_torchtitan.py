"""torchtitan's llama3 debug model through its own parallelize_llama (SelectiveAC, per-block compile, FSDP2 per
layer) on 2 CPU processes, with lhcompile.integrations.torchtitan: the pass after parallelization, and back."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchtitan", reason="torchtitan is an optional extra (pip install -e '.[torchtitan]')")

import lhcompile  # noqa: E402
from lhcompile import LighthouseConfig, lighthouse_attention  # noqa: E402
from tests.distributed import WORLD, close, spawn  # noqa: E402

CFG = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4)  # dense_layers: the paper's (0, 1, -2, -1)
N = 64
VOCAB = 2048  # the debug model's
ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "torchtitan"


def _example_module(name):
    sys.path.insert(0, str(EXAMPLE))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _parallelize(spec, model, world):
    import torchtitan.distributed.parallel_dims as parallel_dims
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.activation_checkpoint import SelectiveAC

    from torch.distributed.fsdp import FSDPModule

    parallel_dims.device_type = "cpu"  # torchtitan picks "cuda" when it sees no accelerator
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=1, world_size=world,
                        spmd_backend="partial_dtensor")
    dims.build_mesh()
    model = spec.parallelize_fn(
        model, parallel_dims=dims, training=TrainingConfig(mixed_precision_param="float32"),
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
        compile_config=CompileConfig(enable=True, backend="aot_eager"), ac_config=SelectiveAC.Config(),
        dump_folder=tempfile.mkdtemp(),
    )
    for module in model.modules():  # torchtitan sums gradients over ranks (factor 1), which gloo can only do so
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    return model


def _built(spec):
    torch.manual_seed(0)  # the same weights on every rank and for the reference
    model = spec.model.build()
    model.init_weights(buffer_device=torch.device("cpu"))
    return model


DOCUMENTS = [[20, 5, 39], [64]]  # per row: packed documents, positions restarting at 0 with each


def _operator_attention(model, positions, config, dense, dtype=None):
    """The model's own code with each layer's inner attention computed by the operator: Lighthouse per document,
    or dense attention within documents for the layers in ``dense`` (FlexAttention has no CPU backward); in
    ``dtype`` where the model's attention casts to it (torchtitan's varlen computes in bf16)."""
    documents = lhcompile.Documents.from_positions(positions)

    def attend(i):
        def forward(q, k, v, *, attention_masks, scale=None, enable_gqa=False, **kwargs):
            given = q.dtype
            q, k, v = (t.transpose(1, 2).to(dtype or given) for t in (q, k, v))
            out = lhcompile.document_attention(q, k, v, documents, scale=scale) if i in dense else \
                lighthouse_attention(q, k, v, config, scale=scale, documents=documents)
            return out.transpose(1, 2).to(given)
        return forward

    for i, layer in enumerate(model.layers.values()):
        layer.attention.inner_attention.forward = attend(i)


def _debug_model(rank):
    from torchtitan.models.llama3 import model_registry

    from lhcompile.integrations import torchtitan as titan

    stock = model_registry("debugmodel")
    assert {type(layer.attention.inner_attention).__qualname__ for layer in stock.model.layers} == \
        {"FlexAttention.Config"}, "torchtitan's llama3 attends with FlexAttention by default"
    tokens = torch.randint(0, VOCAB, (2, N))  # the same batch on both ranks
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCUMENTS])

    # FlexAttention with the paper's dense layers: which layers run Lighthouse per document, said per layer
    # (forward only: FlexAttention has neither a CPU backward nor a trace on CPU with gradients)
    spec = titan.lighthouse(stock, CFG)
    model = _parallelize(spec, _built(spec), WORLD)
    twin = _built(spec)
    _operator_attention(twin, positions, CFG, dense={0, 1, 4, 5})
    with torch.no_grad():
        close(model(tokens, positions, model.get_attention_masks(positions)), twin(tokens, positions),
              "logits, paper's dense layers")
    fates = {s.module_path: s.reason for s in lhcompile.inspect(model).sites if s.training}
    assert fates == {
        **{f"layers.{i}.attention.inner_attention": f"dense layer (site {i} of 6 is in dense_layers=(0, 1, -2, -1))"
           for i in (0, 1, 4, 5)},
        **{f"layers.{i}.attention.inner_attention": "lighthouse per document (document ends of the FlexAttention "
                                                   "mask)" for i in (2, 3)},
    }, str(lhcompile.inspect(model))
    # recovery: torchtitan's stock model again, its checkpoint keys unchanged
    lhcompile.restore(model)
    stock_model = _built(stock)
    stock_model.load_state_dict({k: v.full_tensor() for k, v in model.state_dict().items()})
    with torch.no_grad():
        close(model(tokens, positions, model.get_attention_masks(positions)),
              stock_model(tokens, positions, stock_model.get_attention_masks(positions)), "logits after restore")
    assert list(_built(titan.dense(stock)).state_dict()) == list(stock_model.state_dict()) \
        == list(model.state_dict())

    # varlen, every layer Lighthouse per document (varlen has no CPU kernel: no layer may stay dense here): logits
    # and every gradient equal the operator's, and a step moves the sharded weights
    torch._dynamo.reset()  # the first model's compiled blocks count towards Dynamo's recompile limit
    every = dataclasses.replace(CFG, dense_layers=())
    spec = titan.lighthouse(model_registry("debugmodel", attn_backend="varlen"), every)
    model = _parallelize(spec, _built(spec), WORLD)
    twin = _built(spec)
    _operator_attention(twin, positions, every, dense=set(), dtype=torch.bfloat16)
    want = twin(tokens, positions)
    F.cross_entropy(want.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    out = model(tokens, positions, model.get_attention_masks(positions))
    F.cross_entropy(out.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    close(out, want, "logits")
    for (name, p), (_, p_ref) in zip(model.named_parameters(), twin.named_parameters()):
        close(p.grad.full_tensor() / WORLD, p_ref.grad, f"grad of {name}")  # the same batch on both ranks
    assert {s.reason for s in lhcompile.inspect(model).sites if s.training} == \
        {"lighthouse per document (cu_seq_q of varlen_attn)"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, p.detach().full_tensor()) for a, p in zip(before, model.parameters()))


def test_llama3_debug_model_through_parallelize_llama_runs_lighthouse_per_document_and_restores(tmp_path):
    spawn(_debug_model, tmp_path)


def test_sdpa_converter_refuses_a_config_without_attention_layers():
    from torchtitan.models.llama3 import model_registry

    from lhcompile.integrations.torchtitan import SdpaAttention

    config = model_registry("debugmodel").model
    config.layers = []
    with pytest.raises(ValueError, match="no layer with an attention.inner_attention"):
        SdpaAttention(SdpaAttention.Config()).convert(config)


def test_the_example_registry_loads_through_torchtitans_own_config_manager(monkeypatch):
    from torchtitan.config import ConfigManager

    monkeypatch.syspath_prepend(str(EXAMPLE))
    stage = {name: ConfigManager().parse_args(["--module", "lighthouse_llama3", "--config", name])
             for name in ("llama3_8b_lighthouse", "llama3_8b_recovery", "llama3_8b_dense")}
    assert stage["llama3_8b_lighthouse"].model_spec.parallelize_fn.__name__ == "parallelize_then_lighthouse"
    assert stage["llama3_8b_recovery"].model_spec.parallelize_fn.__name__ == "parallelize_llama"
    assert stage["llama3_8b_lighthouse"].dump_folder == stage["llama3_8b_recovery"].dump_folder  # it resumes there
    assert stage["llama3_8b_lighthouse"].training.steps == 7000 and stage["llama3_8b_recovery"].training.steps == 10000
    for config in stage.values():
        inner = {type(layer.attention.inner_attention).__qualname__ for layer in config.model_spec.model.layers}
        assert inner == {"FlexAttention.Config"}  # torchtitan's own attention in every stage
        assert config.checkpoint.enable and config.training.seq_len == 32768
    # each offline pair has a dilated-scorer Lighthouse config beside the norm one
    norm, dilated = (ConfigManager().parse_args(["--module", "lighthouse_llama3", "--config", name])
                     for name in ("llama3_100m_flex_lighthouse", "llama3_100m_flex_lighthouse_dilated"))
    assert norm.model_spec.parallelize_fn.config.scorer == "norm"
    assert dilated.model_spec.parallelize_fn.config.scorer == "dilated" and dilated.dump_folder != norm.dump_folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchtitans_trainer_runs_the_lighthouse_config_offline_and_logs_which_layers_run_lighthouse(tmp_path):
    # the example's own offline config through torchtitan's own entry point, config manager, local dataset and
    # byte-level tokenizer; only the length (the CPU config runs Lighthouse from 2048), the batch, the backend and
    # the corpus are cut for CPU
    throughput = _example_module("throughput")
    env = dict(os.environ, MASTER_PORT=str(_free_port()), PYTHONPATH=str(EXAMPLE),
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "torchtitan_trainer_on_cpu.py"), "--module", "lighthouse_llama3",
         "--config", "llama3_debugmodel_cpu_lighthouse", "--training.steps=2", "--training.seq_len=2048",
         "--training.local_batch_size=1", "--compile.backend=aot_eager",
         f"--dataloader.dataset_path={ROOT / 'lhcompile'}"],  # lhcompile's own sources: enough for 2 steps
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    steps = throughput.parse(log)
    assert sorted(steps) == [1, 2], log[-3000:]
    assert steps[2][0] < steps[1][0], f"the loss did not move down: {steps}"
    summary = throughput.summarize(steps, warmup=1)
    assert summary["timed_tokens_per_s"] == [steps[2][2]] and summary["tokens_per_s"] == steps[2][2], summary
    report = throughput.site_report(log)
    assert "lhcompile: 6 of 6 attention sites rewritten" in report, log[-3000:]
    rows = [re.split(r"\s{2,}", line) for line in report.splitlines() if "inner_attention" in line]
    assert {row[2]: row[-1] for row in rows} == {
        f"layers.{i}.attention.inner_attention": "lighthouse per document (cu_seq_q of varlen_attn)"
        for i in range(6)}, report


def test_offline_byte_tokenizer_and_local_files_dataset_through_torchtitans_own_classes(tmp_path):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    offline_data = _example_module("offline_data")

    tokenizer = HuggingFaceTokenizer(tokenizer_path=offline_data.byte_tokenizer(tmp_path / "tok"))
    text = "def f(x):\n    return 'héllo ✓'\t\x00\n"
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert ids == [256, *text.encode(), 257]  # token id = UTF-8 byte, then the two specials
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.get_vocab_size()) == (256, 257, 258)
    assert tokenizer.decode(ids[1:-1]) == text

    files = tmp_path / "corpus"
    (files / "pkg").mkdir(parents=True)
    (files / "pkg" / "b.py").write_bytes(b"print('b')\n")
    (files / "a.py").write_bytes(b"x = 1\n\xff\n")  # a stray non-UTF-8 byte: kept as U+FFFD, not dropped
    (files / "notes.txt").write_text("not python")
    offline_data.register_local_files()
    dataset = HuggingFaceTextDataset(offline_data.LOCAL_FILES, str(files), tokenizer, seq_len=8)
    got = [int(t) for sample, _ in dataset for t in sample["input"]]
    want = [256, *"x = 1\n\ufffd\n".encode(), 256, *b"print('b')\n"]  # a.py then pkg/b.py, each after <bos>
    assert got == want[:len(got)] and len(got) == 8 * (len(want) // 8)

    with pytest.raises(FileNotFoundError, match="no \\*.py file under"):
        next(iter(HuggingFaceTextDataset(offline_data.LOCAL_FILES, str(files / "pkg" / "none"), tokenizer)))


def test_older_torch_shims_keep_torchtitans_varlen_on_pytorchs_own_flash_kernels(monkeypatch):
    """What the GPU benchmark needs on torch 2.11 and a Hopper GPU without FlashAttention 3's package: simulated
    here, since this torch has the newer varlen_attn and no GPU."""
    import torchtitan.tools.utils as utils
    from torch.nn.attention import varlen

    older_torch = _example_module("older_torch")
    seen = []

    def varlen_attn_of_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                                  scale=None, window_size=(-1, -1)):
        seen.append(window_size)
        return query

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn_of_torch_2_11)
    assert older_torch._varlen_arguments() == ["varlen_attn(enable_gqa, num_splits)"]
    q = torch.randn(8, 2, 4)
    assert varlen.varlen_attn(q, q, q, None, None, 8, 8, window_size=(-1, 0), num_splits=1, enable_gqa=False) is q
    assert seen == [(-1, 0)]
    with pytest.raises(NotImplementedError, match="split keys"):
        varlen.varlen_attn(q, q, q, None, None, 8, 8, num_splits=4)
    with pytest.raises(NotImplementedError, match="grouped-query"):
        varlen.varlen_attn(q, q, q, None, None, 8, 8, enable_gqa=True)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(utils, "get_cuda_flash_attention_impl", lambda: "FA3")
    assert older_torch._flash_attention_packages() == [
        "get_cuda_flash_attention_impl() -> None (FA3: no flash_attn_interface)"]
    assert utils.get_cuda_flash_attention_impl() is None
