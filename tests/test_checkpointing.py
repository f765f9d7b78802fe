"""Activation checkpointing as users turn it on: transformers' checkpointing of every layer (with Python side
effects inside the checkpointed code, as transformers >= 5.25 routes its kernel hub through a context variable
there, and with the saved activations offloaded to the host), torch.utils.checkpoint around blocks (some or all of
them, one that keeps a counter). Each runs Lighthouse with the gradients of the model that is not checkpointed, the
recomputed forward selecting what the forward did, or says why not; and the causal mask that fed checkpointed layers
is not built."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint

import lhcompile
from lhcompile import LighthouseWarning

from .models import GPT, VOCAB, CheckpointedGPT, hf_model, logits
from .steps import CFG, N, assert_same_training_step, captured


class _Active:
    """A module-level value that an attention module sets for its forward and resets after, as transformers' kernel
    hub (``kernels.use_kernelized_func``) does with a context variable that is a plain global under torch.compile."""

    value: object = None


def _with_context(forward):
    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        before, _Active.value = _Active.value, self
        try:
            return forward(self, *args, **kwargs)
        finally:
            _Active.value = before
    return wrapped


def _offloaded(function, *args, **kwargs):
    """transformers' activation_checkpointing_enable(offload=True): the checkpoint's saved inputs on the host (its
    own pins memory, which needs an accelerator)."""
    with save_on_cpu(pin_memory=False):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def _checkpointed_qwen3(monkeypatch, side_effect: bool, offload: bool):
    import transformers.models.qwen3.modeling_qwen3 as qwen3

    torch.manual_seed(0)
    model = hf_model("qwen3")
    twin = copy.deepcopy(model)  # never checkpointed
    if side_effect:
        monkeypatch.setattr(qwen3.Qwen3Attention, "forward", _with_context(qwen3.Qwen3Attention.forward))
    model.gradient_checkpointing_enable()
    if offload:
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=_offloaded)
    return model, twin


@pytest.mark.parametrize("regional", [True, False], ids=["by layer", "whole"])
def test_side_effects_inside_transformers_checkpointed_layers_keep_lighthouse(monkeypatch, regional):
    model, twin = _checkpointed_qwen3(monkeypatch, side_effect=True, offload=False)
    lhcompile.apply(model, CFG, compiler="eager", regional=regional)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        assert_same_training_step(model, twin, torch.randint(0, VOCAB, (2, N)), {1, 2})
    assert [s.module_path for s in lhcompile.inspect(model).rewritten] == [
        "model.layers.1.self_attn", "model.layers.2.self_attn"]
    assert _Active.value is None


def test_offloaded_checkpointing_runs_lighthouse_layer_by_layer(monkeypatch):
    # the checkpoint and its saved-tensor hooks run as written; the compiled graph is the body they checkpoint
    model, twin = _checkpointed_qwen3(monkeypatch, side_effect=True, offload=True)
    lhcompile.apply(model, CFG, compiler="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        assert_same_training_step(model, twin, torch.randint(0, VOCAB, (2, N)), {1, 2})
    assert [s.index for s in lhcompile.inspect(model).rewritten] == [1, 2]


def test_offloaded_checkpointing_compiled_whole_says_why_its_layers_run_dense(monkeypatch):
    # Dynamo cannot enter save_on_cpu inside the model's graph: the layers run eagerly, dense, and the cause is said
    model, _ = _checkpointed_qwen3(monkeypatch, side_effect=False, offload=True)
    lhcompile.apply(model, CFG, compiler="eager", regional=False)
    with pytest.warns(LighthouseWarning, match="save_on_cpu") as record:
        logits(model, torch.randint(0, VOCAB, (2, N))).sum().backward()
    said = " ".join(str(w.message) for w in record)
    assert "recompile limit" not in said, said
    report = lhcompile.inspect(model)
    assert all("Dynamo could not capture it" in s.reason and "save_on_cpu" in s.reason
               for s in report if s.index in (1, 2)), str(report)


class CountingBlock(nn.Module):
    """A GPT block that counts its calls (Python state changed inside the checkpointed code)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block, self.calls = block, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.block(x)


class CheckpointedCounting(GPT):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([CountingBlock(block) for block in self.blocks])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.head(self.ln_f(x))


@pytest.mark.parametrize("regional", [True, False], ids=["by layer", "whole"])
def test_a_checkpointed_block_with_a_side_effect_runs_lighthouse(regional):
    torch.manual_seed(0)
    model = CheckpointedCounting()
    twin = GPT()
    twin.load_state_dict({k.replace(".block.", "."): v for k, v in model.state_dict().items()})
    lhcompile.apply(model, CFG, compiler="eager", regional=regional)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        assert_same_training_step(model, twin, torch.randint(0, VOCAB, (2, N)), {1, 2})
    assert [s.index for s in lhcompile.inspect(model).rewritten] == [1, 2]
    # its count moved with every forward it ran (the checkpoint's recompute counts again where it runs as written)
    assert all(block.calls >= 1 for block in model.blocks)


def test_hf_gradient_checkpointing_with_sdpa_is_rewritten_and_recomputes_the_same_selection():
    # the everyday case: the causal mask is built outside the checkpointed layers and enters each as an input
    torch.manual_seed(0)
    model = hf_model("qwen3")
    twin = copy.deepcopy(model)  # never checkpointed: what the recomputed forward must reproduce
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, VOCAB, (2, N))
    lhcompile.apply(model, CFG, compiler="eager")
    assert_same_training_step(model, twin, ids, {1, 2})
    report = lhcompile.inspect(model)
    assert [s.module_path for s in report.rewritten] == ["model.layers.1.self_attn", "model.layers.2.self_attn"]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_a_causal_mask_shared_by_every_layer_is_evaluated_once(checkpointing, monkeypatch):
    # proving a mask causal evaluates it (N x N); the layers read one mask, in one graph or passed into each
    # checkpointed layer's body, and the proof holds for all of them (compiled as a whole: layer by layer, the
    # model builds no mask)
    from lhcompile.passes import causal_mask

    evaluated = []
    evaluate = causal_mask.evaluate
    monkeypatch.setattr(causal_mask, "evaluate", lambda *a: evaluated.append(a) or evaluate(*a))
    model = hf_model("qwen3")
    if checkpointing:
        model.gradient_checkpointing_enable()
    lhcompile.apply(model, CFG, compiler="eager", regional=False)
    logits(model, torch.randint(0, VOCAB, (2, N)))
    assert len(lhcompile.inspect(model).rewritten) == 2
    assert len(evaluated) == 1


@pytest.mark.parametrize("which", ["every", "odd"])
def test_torch_utils_checkpoint_per_block_is_rewritten_with_the_same_gradients(which):
    # with only some blocks checkpointed, dense_layers must still count the sites in execution order
    torch.manual_seed(0)
    model = CheckpointedGPT((lambda i: True) if which == "every" else (lambda i: i % 2 == 1))
    twin = GPT()
    twin.load_state_dict(model.state_dict())
    lhcompile.apply(model, CFG, compiler="eager")
    assert_same_training_step(model, twin, torch.randint(0, VOCAB, (2, N)), {1, 2})
    report = lhcompile.inspect(model)
    assert [s.module_path for s in report.rewritten] == ["blocks.1", "blocks.2"], str(report)


@pytest.mark.parametrize("regional", [True, False], ids=["by-layer", "whole"])
def test_causal_mask_that_fed_checkpointed_layers_is_not_built_dense_layers_included(regional):
    n = 3 * N  # no weight or activation dimension is n
    model = hf_model("qwen3")
    model.gradient_checkpointing_enable()
    graphs = captured(model, CFG, torch.randint(0, VOCAB, (1, n)), regional=regional)
    report = lhcompile.inspect(model)
    assert len(report.rewritten) == 2, str(report)
    # compiled whole, the mask is built in the graph and proven causal; layer by layer, transformers passes none
    assert all(("is_causal=True" in s.reason) != regional for s in report.dense), str(report)
    shapes = [v.shape for gm in graphs for module in gm.modules() if isinstance(module, fx.GraphModule)
              for node in module.graph.nodes if isinstance(v := node.meta.get("example_value"), torch.Tensor)]
    assert shapes and not [s for s in shapes if s[-2:] == (n, n)]

