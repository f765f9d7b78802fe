"""Setups that used to leave a model quietly dense or quietly wrong, tried from the user's side: activation
checkpointing, compiled blocks, train/eval switching, causal_sdpa on windows and padding, torch.compile'd
models, and the warnings that say what the pass could not do."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import lhcompile
from lhcompile import LighthouseConfig, LighthouseWarning, lighthouse_attention
from lhcompile.passes import METADATA_TO_PORT, REWRITE_TAG, module_path

from .models import GPT, VOCAB, SdpaAt, TitanLlama3, hf_model, logits

CFG = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=(0, -1))
N = 64


def lighthouse_at(sites: set[int], config: LighthouseConfig = CFG) -> SdpaAt:
    return SdpaAt(sites, lambda q, k, v, scale: lighthouse_attention(q, k, v, config, scale=scale))


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def assert_same_training_step(model, twin, ids, sites, config=CFG, tol=1e-6):
    """Logits and every gradient of ``model`` equal ``twin``'s own code with ``sites`` sent to the operator."""
    out = logits(model, ids)
    _loss(out).backward()
    with lighthouse_at(sites, config):
        want = logits(twin, ids)
    _loss(want).backward()
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")


def _captured(model, config, ids, **kwargs):
    """Apply with a compiler that keeps the rewritten graphs, run once; returns them."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    lhcompile.apply(model, config, compiler=keep, **kwargs)
    logits(model, ids)
    return graphs


# -- activation checkpointing ----------------------------------------------------------------------


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
    # checkpointed layer's body, and the proof holds for all of them
    from lhcompile.passes import causal_mask

    evaluated = []
    evaluate = causal_mask._evaluate
    monkeypatch.setattr(causal_mask, "_evaluate", lambda *a: evaluated.append(a) or evaluate(*a))
    model = hf_model("qwen3")
    if checkpointing:
        model.gradient_checkpointing_enable()
    lhcompile.apply(model, CFG, compiler="eager")
    logits(model, torch.randint(0, VOCAB, (2, N)))
    assert len(lhcompile.inspect(model).rewritten) == 2
    assert len(evaluated) == 1


class CheckpointedGPT(GPT):
    """nanoGPT style: torch.utils.checkpoint around the blocks ``checkpointed`` picks."""

    def __init__(self, checkpointed=lambda i: True):
        super().__init__()
        self.checkpointed = checkpointed

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for i, block in enumerate(self.blocks):
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointed(i) else block(x)
        return self.head(self.ln_f(x))


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


def test_causal_mask_that_fed_checkpointed_layers_is_not_built_once_all_are_lighthouse():
    n = 3 * N  # no weight or activation dimension is n
    model = hf_model("qwen3")
    model.gradient_checkpointing_enable()
    graphs = _captured(model, dataclasses.replace(CFG, dense_layers=()), torch.randint(0, VOCAB, (1, n)))
    assert len(lhcompile.inspect(model).rewritten) == 4
    shapes = [v.shape for gm in graphs for module in gm.modules() if isinstance(module, fx.GraphModule)
              for node in module.graph.nodes if isinstance(v := node.meta.get("example_value"), torch.Tensor)]
    assert shapes and not [s for s in shapes if s[-2:] == (n, n)]


# -- compiled blocks, torch.compile'd models -------------------------------------------------------


def test_blocks_compiled_in_place_are_taken_over_per_kind_and_given_back_on_restore():
    # torchtitan's apply_compile: block.compile() on every layer before anything else
    torch.manual_seed(0)
    model = TitanLlama3()
    twin = copy.deepcopy(model)
    for block in model.layers.values():
        block.compile(backend="eager")
    before = {block: block._compiled_call_impl for block in model.layers.values()}
    ids = torch.randint(0, VOCAB, (2, N))
    lhcompile.apply(model, CFG, compiler="eager")
    assert_same_training_step(model, twin, ids, {1, 2})
    # Dynamo inlines the blocks into the model's own graph (no FSDP hook splits it): decided there, by site
    fates = {s.module_path: s.reason for s in lhcompile.inspect(model).sites if s.training}
    assert fates == {
        "layers.0.attention": "dense layer (site 0 is in dense_layers=(0, -1))",
        "layers.1.attention": "lighthouse",
        "layers.2.attention": "lighthouse",
        "layers.3.attention": "dense layer (site 3 is in dense_layers=(0, -1))",
    }
    lhcompile.restore(model)
    assert {block: block._compiled_call_impl for block in model.layers.values()} == before
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("called_first", [False, True], ids=["fresh", "already-called"])
def test_apply_to_a_torch_compiled_model_rewrites_the_module_it_wraps(called_first):
    torch.manual_seed(0)
    model = GPT()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(0, VOCAB, (2, N))
    if called_first:
        logits(compiled, ids)
    assert lhcompile.apply(compiled, CFG, compiler="eager") is compiled
    with lighthouse_at({1, 2}):
        want = logits(twin, ids)
    torch.testing.assert_close(logits(compiled, ids), want, rtol=1e-6, atol=1e-6)
    assert len(lhcompile.inspect(compiled).rewritten) == 2
    lhcompile.restore(compiled)
    torch.testing.assert_close(logits(compiled, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)


# -- train / eval ----------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["train", "eval"])
def test_the_module_mode_decides_every_call_even_when_forward_never_reads_it(first):
    torch.manual_seed(0)
    model = TitanLlama3()  # its forward never reads self.training, so Dynamo does not guard on it
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, N))
    model.train(first == "train")
    lhcompile.apply(model, CFG, compiler="eager")
    with torch.no_grad(), lighthouse_at({1, 2}):
        lighthouse = logits(twin, ids)
    with torch.no_grad():
        dense = logits(twin, ids)
    for mode in ([True, False, True, False] if first == "train" else [False, True, False, True]):
        model.train(mode)
        got = logits(model, ids)
        torch.testing.assert_close(got, lighthouse if mode else dense, rtol=1e-6, atol=1e-6,
                                   msg=f"{'train' if mode else 'eval'} mode")


# -- causal_sdpa -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,config,padded", [
    ("mistral", {"sliding_window": 16}, False),
    ("gemma3", {"sliding_window": 16}, False),
    ("qwen3", {}, True),
])
def test_causal_sdpa_computes_what_sdpa_computes_on_windows_and_padding(kind, config, padded):
    ids = torch.randint(0, VOCAB, (2, N))
    mask = None
    if padded:
        mask = torch.ones(2, N, dtype=torch.long)
        mask[1, :10] = 0  # left padding
    out = {}
    for attention in ("sdpa", "causal_sdpa"):
        torch.manual_seed(0)
        model = hf_model(kind, attention=attention, **config).eval()
        with torch.no_grad():
            out[attention] = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool() if padded else torch.ones(2, N, dtype=torch.bool)
    assert torch.equal(out["sdpa"][real], out["causal_sdpa"][real])


class SdpaCalls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((kwargs.get("is_causal"), kwargs.get("attn_mask", args[3] if len(args) > 3 else None)))
        return func(*args, **kwargs)


def test_causal_sdpa_builds_no_mask_where_the_mask_is_plainly_causal():
    model = hf_model("llama", attention="causal_sdpa").eval()
    with SdpaCalls() as plain, torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (2, N)))
    assert plain.calls == [(True, None)] * 4
    with SdpaCalls() as padded, torch.no_grad():
        mask = torch.ones(2, N, dtype=torch.long)
        mask[0, :3] = 0
        model(input_ids=torch.randint(0, VOCAB, (2, N)), attention_mask=mask)
    assert all(mask is not None for _, mask in padded.calls) and len(padded.calls) == 4


@pytest.mark.parametrize("how", ["torch.compile", "lhcompile.apply"])
def test_causal_sdpa_keeps_packed_documents_apart_eagerly_and_says_what_it_assumes_under_compile(how, monkeypatch):
    positions = torch.cat([torch.arange(40), torch.arange(N - 40)])[None].expand(2, -1)  # two packed documents
    ids = torch.randint(0, VOCAB, (2, N))
    out = {}
    for attention in ("sdpa", "causal_sdpa"):
        torch.manual_seed(0)
        with torch.no_grad():
            out[attention] = hf_model("llama", attention=attention).eval()(input_ids=ids, position_ids=positions).logits
    assert torch.equal(out["sdpa"], out["causal_sdpa"])

    # compiled, packing cannot be seen: the guess is said at the first call, with or without the pass
    monkeypatch.setattr(lhcompile.hf, "_noted", False)  # once per process: earlier tests may have been told
    model = hf_model("llama", attention="causal_sdpa")
    torch._dynamo.reset()
    if how == "torch.compile":
        model = torch.compile(model, backend="eager")
    else:
        lhcompile.apply(model, CFG, compiler="eager")
    with pytest.warns(LighthouseWarning, match="positions of one sequence: documents packed with restarting"):
        model(input_ids=ids, position_ids=positions)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        model(input_ids=ids, position_ids=positions)  # said once


def test_sliding_window_sites_of_causal_sdpa_stay_dense_under_the_pass():
    torch.manual_seed(0)
    model = hf_model("mistral", attention="causal_sdpa", sliding_window=16)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, N))
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    torch.testing.assert_close(logits(model, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)
    report = lhcompile.inspect(model)
    assert not report.rewritten and all("not the causal mask" in s.reason for s in report.sites), str(report)


# -- what the pass cannot do is said --------------------------------------------------------------


def test_a_model_that_gets_nothing_rewritten_is_warned_with_every_reason_per_site():
    # the README's snippet on a small model: the default dense_layers cover all 4 layers, and k=2048 needs N >= 32K
    model = GPT()
    lhcompile.apply(model, LighthouseConfig(), compiler="eager")
    with pytest.warns(LighthouseWarning, match="no SDPA site was rewritten") as record:
        logits(model, torch.randint(0, VOCAB, (1, N)))
        logits(model, torch.randint(0, VOCAB, (1, N)))  # warned once
    [warning] = [w for w in record if "no SDPA site" in str(w.message)]
    text = str(warning.message)
    for layer in range(4):
        assert f"blocks.{layer}" in text
    assert text.count("sequence too short: N=64 < min_lighthouse_len=32768") == 4
    assert text.count("dense layer (site") == 4
    assert "dense layer" in lhcompile.inspect(model).sites[1].reason
    assert "sequence too short" in lhcompile.inspect(model).sites[1].reason


def test_backend_says_it_takes_the_mode_from_grad_mode():
    lighthouse = lhcompile.backend(dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    torch._dynamo.reset()
    model = torch.compile(GPT(), backend=lighthouse)
    ids = torch.randint(0, VOCAB, (1, N))
    with pytest.warns(LighthouseWarning, match="gradients disabled, so it is taken for evaluation: its 4 SDPA"):
        with torch.no_grad():
            model(ids)
    assert lighthouse.report.sites and not lighthouse.report.rewritten
    with pytest.warns(LighthouseWarning, match="gradients enabled, so it is taken for training"):
        model(ids)  # grad mode is part of Dynamo's guards: a second graph, for training
    assert len(lighthouse.report.rewritten) == 4


def test_a_graph_with_attention_but_no_sdpa_call_is_warned_about():
    from torch.nn.attention.flex_attention import flex_attention

    class FlexModel(torch.nn.Module):  # torchtitan's llama3 attends with FlexAttention by default
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            q = self.proj(x).view(1, 2, N, 8)
            return flex_attention(q, q, q)

    model = FlexModel()
    lhcompile.apply(model, CFG, compiler="eager")
    with pytest.warns(LighthouseWarning, match="flex_attention x1"), torch.no_grad():  # no CPU backward for flex
        model(torch.randn(1, N, 16))
    assert "no SDPA call to rewrite" in str(lhcompile.inspect(model))


def test_settings_that_can_never_engage_are_warned_about():
    model = hf_model("llama")  # max_position_embeddings=512
    with pytest.warns(LighthouseWarning, match="at least 32768 tokens .* max_position_embeddings=512"):
        lhcompile.apply(model, LighthouseConfig(), compiler="eager")
    torch._dynamo.reset()
    model = GPT()
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=(0, 7, -9)), compiler="eager")
    with pytest.warns(LighthouseWarning, match=r"dense_layers entries \[7, -9\] are outside the 4 SDPA sites"):
        logits(model, torch.randint(0, VOCAB, (1, N)))


@pytest.mark.parametrize("kwargs,error,words", [
    ({"compiler": "nonexistent"}, ValueError, ["compiler='nonexistent'", "inductor", "eager", "aot_eager"]),
    ({"compiler": 3}, TypeError, ["compiler must be a backend name or a callable"]),
    ({"config": {"topk": 8}}, TypeError, ["config must be a lhcompile.LighthouseConfig", "dict"]),
    ({"filter_fn": "layers.1"}, TypeError, ["filter_fn must be a callable"]),
])
def test_bad_arguments_fail_at_apply_naming_the_argument(kwargs, error, words):
    model = GPT()
    config = kwargs.pop("config", CFG)
    with pytest.raises(error) as raised:
        lhcompile.apply(model, config, **kwargs)
    for word in words:
        assert word in str(raised.value)
    assert model._compiled_call_impl is None  # nothing was done


def test_site_paths_are_the_module_paths_a_user_knows():
    graph = fx.Graph()
    node = graph.placeholder("x")
    node.meta["nn_module_stack"] = {"a": (
        "L['self'].layers['0'].attention.forward.__closure__[0].cell_contents.__self__._checkpoint_wrapped_module"
        ".inner_attention", object)}
    assert module_path(node) == "layers.0.attention.inner_attention"
    node.meta["nn_module_stack"] = {"a": ("L['self'].__dict__['_modules']['_checkpoint_wrapped_module'].attention", object)}
    assert module_path(node) == "attention"


def test_replacement_nodes_keep_the_user_module_of_the_sdpa_call_they_replace():
    graphs = _captured(GPT(), dataclasses.replace(CFG, dense_layers=()), torch.randint(0, VOCAB, (1, N)))
    tagged = [n for gm in graphs for n in gm.graph.nodes if REWRITE_TAG in n.meta]
    assert {n.meta[REWRITE_TAG]["site"] for n in tagged} == {0, 1, 2, 3}
    for node in tagged:
        assert set(METADATA_TO_PORT[:2]) <= set(node.meta), node.name
        assert module_path(node) == f"blocks.{node.meta[REWRITE_TAG]['site']}"
        assert "scaled_dot_product_attention" in node.meta["stack_trace"]


def test_passes_install_inside_lhcompile_not_as_a_top_level_package(tmp_path):
    code = ("import importlib.util, lhcompile.passes; "
            "print(importlib.util.find_spec('passes') is None, lhcompile.passes.find_sdpa_sites.__module__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.stdout.split() == ["True", "lhcompile.passes.match"], run.stderr


def test_the_quiet_path_stays_quiet():
    # a model that gets its Lighthouse sites rewritten and is then restored raises no warning at all
    model = GPT()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        lhcompile.apply(model, CFG, compiler="eager")
        logits(model, torch.randint(0, VOCAB, (1, N)))
        lhcompile.restore(model)
