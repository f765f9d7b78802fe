"""The Hugging Face Trainer with LighthouseCallback: Lighthouse, then dense at the given share of the steps, with
gradient checkpointing on, evaluation always dense, and the untouched model at the end."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import lhcompile
from lhcompile import LighthouseConfig, lighthouse_attention
from lhcompile.integrations.hf import LighthouseCallback

from .models import VOCAB, SdpaAt, hf_model

CFG = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=(0, -1))
N = 64


def _data(count: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (count, N), generator=gen)]


class Check(TrainerCallback):
    """At each evaluation, what the trained model computes, against a plain copy of its current weights."""

    def __init__(self, model, eval_data):
        self.model, self.eval_data, self.seen = model, eval_data, []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        twin = hf_model("llama")
        twin.load_state_dict(self.model.state_dict())
        with torch.no_grad():  # the Trainer's eval loss is the dense model's
            dense = sum(twin(**batch).loss for batch in _batches(self.eval_data)) / (len(self.eval_data) // 2)
        ids = self.eval_data[0]["input_ids"][None]
        self.model.train()
        with torch.no_grad():
            got = self.model(input_ids=ids).logits
        with torch.no_grad(), SdpaAt({1, 2}, lambda q, k, v, scale: lighthouse_attention(q, k, v, CFG, scale=scale)):
            lighthouse = twin(input_ids=ids).logits
        with torch.no_grad():
            plain = twin(input_ids=ids).logits
        mode = "lighthouse" if torch.allclose(got, lighthouse, atol=1e-5) else "dense" if torch.allclose(
            got, plain, atol=1e-5) else "neither"
        self.seen.append((state.global_step, metrics["eval_loss"], dense.item(), mode))


def _batches(data):
    for i in range(0, len(data), 2):
        yield {k: torch.stack([row[k] for row in data[i : i + 2]]) for k in data[0]}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch_compile"])
def test_trainer_switches_to_dense_at_the_recovery_share_and_evaluates_dense(tmp_path, compiled):
    torch.manual_seed(0)
    model = hf_model("llama")
    eval_data = _data(4, seed=1)
    lighthouse = LighthouseCallback(CFG, recovery_start=0.7)
    check = Check(model, eval_data)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2,
                             per_device_eval_batch_size=2, gradient_checkpointing=True, eval_strategy="steps",
                             eval_steps=4, learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True, torch_compile=compiled,
                             torch_compile_backend="eager" if compiled else None)
    trainer = Trainer(model=model, args=args, train_dataset=_data(20, seed=0), eval_dataset=eval_data,
                      callbacks=[lighthouse, check])
    trainer.train()
    assert lighthouse.switch_step == lighthouse.switched_at == 7
    trained = [s for s in lighthouse.report.sites if s.training]
    # (the training graph, and the one the check above ran without gradients)
    assert {s.module_path for s in trained if s.rewritten} == {"model.layers.1.self_attn", "model.layers.2.self_attn"}
    # evaluations at steps 4, 8 and 10: the loss is the dense model's both times; training mode ran Lighthouse
    # before the switch and dense after it
    assert [(step, mode) for step, _, _, mode in check.seen] == [(4, "lighthouse"), (8, "dense"), (10, "dense")]
    for _, reported, dense, _ in check.seen:
        assert reported == pytest.approx(dense, rel=1e-5)
    assert lhcompile.inspect(model).state == "restored"  # the untouched model again; the report says so
    twin = copy.deepcopy(model)
    ids = eval_data[0]["input_ids"][None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)


def test_recovery_start_must_be_a_share():
    with pytest.raises(ValueError, match="recovery_start=1.5 must be a share"):
        LighthouseCallback(CFG, recovery_start=1.5)
