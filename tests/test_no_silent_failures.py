"""Setups that used to leave a model quietly dense or quietly wrong, tried from the user's side: activation
checkpointing, compiled blocks, train/eval switching, causal_sdpa on windows and padding, torch.compile'd
models, and the warnings that say what the pass could not do."""

from __future__ import annotations

import copy
import dataclasses
import functools
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

from .models import GPT, VOCAB, NanoGPT, SdpaAt, TitanLlama3, hf_model, logits

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


@pytest.mark.parametrize("regional", [True, False], ids=["by-layer", "whole"])
def test_causal_mask_that_fed_checkpointed_layers_is_not_built_dense_layers_included(regional):
    n = 3 * N  # no weight or activation dimension is n
    model = hf_model("qwen3")
    model.gradient_checkpointing_enable()
    graphs = _captured(model, CFG, torch.randint(0, VOCAB, (1, n)), regional=regional)
    report = lhcompile.inspect(model)
    assert len(report.rewritten) == 2, str(report)
    # compiled whole, the mask is built in the graph and proven causal; layer by layer, transformers passes none
    assert all(("is_causal=True" in s.reason) != regional for s in report.dense), str(report)
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
    # each kind of block is compiled once, the model's own code runs as written around them
    report = lhcompile.inspect(model)
    fates = {s.module_path: s.reason for s in report if s.training}
    assert fates == {
        "layers.0.attention": "dense layer (site 0 of 4 is in dense_layers=(0, -1))",
        "layers.1.attention": "lighthouse",
        "layers.2.attention": "lighthouse",
        "layers.3.attention": "dense layer (site 3 of 4 is in dense_layers=(0, -1))",
    }
    assert (report.graphs, report.compiled) == (1, 2)  # one graph serves the blocks, dense and Lighthouse
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


# -- what the pass cannot do is said --------------------------------------------------------------


def test_a_model_that_gets_nothing_rewritten_is_warned_with_every_reason_per_site():
    # the README's snippet on a small model: the default dense_layers cover all 4 layers, and k=2048 needs N >= 32K
    model = GPT()
    lhcompile.apply(model, LighthouseConfig(), compiler="eager")
    with pytest.warns(LighthouseWarning, match="none of the 4 attention sites was rewritten") as record:
        logits(model, torch.randint(0, VOCAB, (1, N)))
        logits(model, torch.randint(0, VOCAB, (1, N)))  # warned once
    [warning] = [w for w in record if "was rewritten" in str(w.message)]
    text, report = str(warning.message), lhcompile.inspect(model)
    # one line: the commonest reason, and where the table of every site's reasons is
    assert "\n" not in text and "sequence too short: N=64 < min_lighthouse_len=32768" in text
    assert "lhcompile.inspect(model)" in text
    assert [s.module_path for s in report] == [f"blocks.{layer}" for layer in range(4)]
    for site in report:
        assert "sequence too short: N=64 < min_lighthouse_len=32768" in site.reason
        assert f"dense layer (site {site.index} of 4" in site.reason


def test_backend_says_it_takes_the_mode_from_grad_mode():
    lighthouse = lhcompile.backend(dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    torch._dynamo.reset()
    model = torch.compile(GPT(), backend=lighthouse)
    ids = torch.randint(0, VOCAB, (1, N))
    with pytest.warns(LighthouseWarning, match="gradients disabled, so it is taken for evaluation: its 4 attention"):
        with torch.no_grad():
            model(ids)
    assert lighthouse.report.sites and not lighthouse.report.rewritten
    with pytest.warns(LighthouseWarning, match="gradients enabled, so it is taken for training"):
        model(ids)  # grad mode is part of Dynamo's guards: a second graph, for training
    assert len(lighthouse.report.rewritten) == 4


def test_a_graph_with_attention_but_no_call_the_pass_knows_is_warned_about():
    class EagerAttention(torch.nn.Module):  # attention written out, as models without SDPA support do
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            q = self.proj(x).view(1, 2, N, 8)
            scores = (q @ q.transpose(-1, -2)).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
            return torch.softmax(scores, -1) @ q

    model = EagerAttention()
    lhcompile.apply(model, CFG, compiler="eager")
    with pytest.warns(LighthouseWarning, match="softmax x1"):
        model(torch.randn(1, N, 16))
    assert "no attention call to rewrite" in str(lhcompile.inspect(model))


def test_settings_that_can_never_engage_are_warned_about():
    model = hf_model("llama")  # max_position_embeddings=512
    with pytest.warns(LighthouseWarning, match="at least 32768 tokens .* max_position_embeddings=512"):
        lhcompile.apply(model, LighthouseConfig(), compiler="eager")
    # dense_layers counts the model's attention sites, layer by layer or compiled whole: said at the first call, when
    # the model's forward has shown them
    for regional in (True, False):
        torch._dynamo.reset()
        model = GPT()
        lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=(0, 7, -9)), compiler="eager", regional=regional)
        with pytest.warns(LighthouseWarning, match=r"dense_layers entries \[7, -9\] are outside the 4 attention sites"):
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


@pytest.mark.parametrize("field", ["levels", "pooling_factor", "topk", "tile_budget", "min_seq_len", "dense_layers"])
def test_bools_are_not_taken_for_ints_in_the_config(field):
    value = (True,) if field == "dense_layers" else True
    with pytest.raises(ValueError, match=f"LighthouseConfig: {field}=.*not .*bool"):
        LighthouseConfig(**{field: value})


def test_inspect_of_something_that_is_no_model_says_what_it_expects():
    with pytest.raises(TypeError, match="lhcompile.inspect expects the model .* got Tensor"):
        lhcompile.inspect(torch.zeros(2))


class Decorated(GPT):
    """forward behind a decorator that takes *args (as transformers' can_return_tuple does), first argument named
    ``this``: Dynamo names the module L['args'][0] and L['this'] then."""

    @staticmethod
    def _passthrough(forward):
        @functools.wraps(forward)
        def wrapper(*args, **kwargs):
            return forward(*args, **kwargs)

        return wrapper

    @_passthrough
    def forward(this, idx: torch.Tensor) -> torch.Tensor:  # noqa: N805
        return GPT.forward(this, idx)


def test_filter_fn_sees_the_models_own_module_names_whatever_the_forward_signature():
    model = Decorated()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)  # no false "captured in a graph of one submodule"
        lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager",
                        filter_fn=lambda path: path != "blocks.0")
        logits(model, torch.randint(0, VOCAB, (1, N)))
    report = lhcompile.inspect(model)
    assert [s.module_path for s in report] == [f"blocks.{i}" for i in range(4)]
    assert [s.rewritten for s in report] == [False, True, True, True]


def test_site_paths_are_the_module_paths_a_user_knows():
    graph = fx.Graph()
    node = graph.placeholder("x")
    node.meta["nn_module_stack"] = {"a": (
        "L['self'].layers['0'].attention.forward.__closure__[0].cell_contents.__self__._checkpoint_wrapped_module"
        ".inner_attention", object)}
    assert module_path(node) == "layers.0.attention.inner_attention"
    node.meta["nn_module_stack"] = {"a": ("L['self'].__dict__['_modules']['_checkpoint_wrapped_module'].attention", object)}
    assert module_path(node) == "attention"
    for root in ("L['args'][0]", "L['this']", "L['kwargs']['model']", "G['model']"):
        node.meta["nn_module_stack"] = {"a": (f"{root}.model.layers[3].self_attn", object)}
        assert module_path(node) == "model.layers.3.self_attn"


def test_replacement_nodes_keep_the_user_module_of_the_sdpa_call_they_replace():
    graphs = _captured(GPT(), dataclasses.replace(CFG, dense_layers=()), torch.randint(0, VOCAB, (1, N)),
                       regional=False)  # one graph holds every site
    tagged = [n for gm in graphs for n in gm.graph.nodes if REWRITE_TAG in n.meta]
    assert {n.meta[REWRITE_TAG]["site"] for n in tagged} == {0, 1, 2, 3}
    for node in tagged:
        assert set(METADATA_TO_PORT[:2]) <= set(node.meta), node.name
        assert module_path(node) == f"blocks.{node.meta[REWRITE_TAG]['site']}"
        assert "scaled_dot_product_attention" in node.meta["stack_trace"]


def test_passes_install_inside_lhcompile_not_as_a_top_level_package(tmp_path):
    code = ("import importlib.util, lhcompile.passes; "
            "print(importlib.util.find_spec('passes') is None, lhcompile.passes.find_sites.__module__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.stdout.split() == ["True", "lhcompile.passes.kinds"], run.stderr


def test_the_quiet_path_stays_quiet():
    # a model that gets its Lighthouse sites rewritten and is then restored raises no warning at all
    model = GPT()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        lhcompile.apply(model, CFG, compiler="eager")
        logits(model, torch.randint(0, VOCAB, (1, N)))
        lhcompile.restore(model)


# -- masks: say what a mask is; prove the causal ones, wherever they come from ---------------------


def test_a_sliced_lower_triangular_buffer_is_proven_causal_and_the_assumption_said():
    torch.manual_seed(0)
    model = NanoGPT()
    twin = copy.deepcopy(model)
    n = 5 * N  # no weight or activation dimension is n
    ids = torch.randint(0, VOCAB, (2, n))
    with pytest.warns(LighthouseWarning, match=r"module buffer\(s\) .* was proven") as record:
        graphs = _captured(model, CFG, ids)
    # one graph serves the layers, dense and Lighthouse: said once, naming the buffers of all of them
    said = [str(w.message) for w in record if "was proven" in str(w.message)]
    assert said == ["lhcompile: the attention mask read from the module buffer(s) h.0.bias, h.1.bias, h.2.bias, "
                    "h.3.bias was proven causal from its values at capture, so its sites run as causal attention "
                    "(Lighthouse, or SDPA with is_causal=True) without reading it; if you change the buffer, call "
                    "lhcompile.restore and apply again"]
    report = lhcompile.inspect(model)
    assert [s.rewritten for s in report] == [False, True, True, False], str(report)
    assert all(s.reason.endswith("runs as SDPA with is_causal=True") for s in report.dense)
    shapes = [v.shape for gm in graphs for node in gm.graph.nodes
              if isinstance(v := node.meta.get("example_value"), torch.Tensor)]
    assert shapes and not [s for s in shapes if s[-2:] == (n, n)]
    lhcompile.restore(model)
    model.load_state_dict(twin.state_dict())
    lhcompile.apply(model, CFG, compiler="eager")
    assert_same_training_step(model, twin, ids, {1, 2})


@pytest.mark.parametrize("regional", [True, False], ids=["by-layer", "whole"])
def test_a_learned_bias_and_a_padding_mask_are_called_what_they_are(regional):
    model = NanoGPT(mask="bias")
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager", regional=regional)
    with pytest.warns(LighthouseWarning, match="none of the 4 attention sites was rewritten"):
        logits(model, torch.randint(0, VOCAB, (1, N)))
    # a layer's graph names its parameters from the layer; each row names the layer
    assert [(s.module_path, s.reason) for s in lhcompile.inspect(model)] == [(
        f"h.{i}", f"explicit attn_mask is a learned bias, computed from parameters ({'' if regional else f'h.{i}.'}"
        "learned), e.g. a relative position bias as in T5: not a causal mask") for i in range(4)]

    # an encoder's padding mask: computed from the model's input, and no advice to make it causal
    import transformers

    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, attn_implementation="sdpa")
    bert = transformers.BertModel(cfg)
    lhcompile.apply(bert, CFG, compiler="eager", regional=regional)
    mask = torch.ones(2, N, dtype=torch.long)
    mask[1, 40:] = 0
    with pytest.warns(LighthouseWarning, match="attention sites was rewritten"):
        bert(input_ids=torch.randint(0, VOCAB, (2, N)), attention_mask=mask)
    for site in lhcompile.inspect(bert):
        made = "a layer compiled on its own receives its mask as an input" if regional else "(attention_mask)"
        assert "computed from the graph's inputs" in site.reason and made in site.reason, site.reason
        assert "causal_sdpa" not in site.reason


def test_a_graph_break_inside_a_layer_leaves_every_site_where_the_model_has_it():
    # the break splits each layer's graph, and compiled whole the rest of each layer is traced from inside it, one
    # graph for all layers: each graph's sites still take their places in the model, so dense_layers counts alike
    ids = torch.randint(0, VOCAB, (1, N))
    for regional in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = NanoGPT(graph_break=True)
        twin = copy.deepcopy(model)
        lhcompile.apply(model, CFG, compiler="eager", regional=regional)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "^(?!.*was proven causal)", LighthouseWarning)
            out = logits(model, ids)
        assert [(s.module_path, s.rewritten) for s in lhcompile.inspect(model)] == [
            ("h.0", False), ("h.1", True), ("h.2", True), ("h.3", False)], str(lhcompile.inspect(model))
        with lighthouse_at({1, 2}):
            torch.testing.assert_close(out, logits(twin, ids), rtol=1e-6, atol=1e-6)


def test_models_transformers_runs_with_eager_attention_only_are_not_told_to_use_sdpa():
    import transformers

    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    attn_implementation="eager", use_cache=False)
    model = transformers.Gemma2ForCausalLM(cfg)
    lhcompile.apply(model, CFG, compiler="eager")
    with pytest.warns(LighthouseWarning, match="calls that look like attention") as record:
        logits(model, torch.randint(0, VOCAB, (1, N)))
    [text] = [str(w.message) for w in record if "look like attention" in str(w.message)]
    assert "transformers runs Gemma2ForCausalLM with eager (or flex) attention only" in text
    assert "attn_implementation='sdpa'" not in text


def test_the_report_is_a_sequence_of_its_sites_and_says_when_a_model_has_no_sdpa():
    model = GPT()
    lhcompile.apply(model, CFG, compiler="eager")
    logits(model, torch.randint(0, VOCAB, (1, N)))
    report = lhcompile.inspect(model)
    assert len(report) == 4 and report[1] is report.rewritten[0]
    assert [s.module_path for s in report] == [f"blocks.{i}" for i in range(4)]

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 1)

        def forward(self, x):
            return self.down(self.up(x).relu())

    mlp = MLP()
    lhcompile.apply(mlp, CFG, compiler="eager")
    assert "no attention site seen yet" in str(lhcompile.inspect(mlp))
    mlp(torch.randn(4, 8)).sum().backward()
    text = str(lhcompile.inspect(mlp))
    assert "call no attention that lhcompile rewrites" in text and "seen yet" not in text


def test_a_graph_captured_with_a_dynamic_length_runs_lighthouse_per_row():
    # a dynamic length (mark_dynamic; Dynamo's automatic dynamic shapes) cannot be decided once for one sequence:
    # each row is one document, which Lighthouse per document runs at any length, the same as at a static one
    ids = torch.randint(0, VOCAB, (1, N + 16))
    static, dynamic = GPT(), GPT()
    dynamic.load_state_dict(static.state_dict())
    for model in (static, dynamic):
        lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager", regional=False)
    want = logits(static, ids)
    logits(dynamic, torch.randint(0, VOCAB, (1, N)))  # static at another length first
    torch._dynamo.mark_dynamic(ids, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        got = logits(dynamic, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rows = [s for s in lhcompile.inspect(dynamic) if s.graph == 1]
    assert len(rows) == 4 and all(s.rewritten and "one per row, at a dynamic sequence length" in s.reason
                                  for s in rows), str(lhcompile.inspect(dynamic))


class GPTWithPooling(GPT):
    """A GPT whose own code attends once more after its layer stack (an attention-pooling head)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        h = x.view(*x.shape[:2], 4, -1).transpose(1, 2)
        x = x + F.scaled_dot_product_attention(h, h, h, is_causal=True).transpose(1, 2).reshape(x.shape)
        return self.head(self.ln_f(x))


def test_attention_outside_the_layer_stack_is_said_to_run_dense_when_compiled_by_layer():
    ids = torch.randint(0, VOCAB, (1, N))
    model = GPTWithPooling()
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    with pytest.warns(LighthouseWarning, match=r"calls attention outside its layer stack \(scaled_dot_product_"
                                               r"attention x1\).*regional=False"):
        logits(model, ids)
    assert len(lhcompile.inspect(model).rewritten) == 4  # every layer's site, none of the head's
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        logits(model, ids)  # said once
        whole = GPTWithPooling()
        lhcompile.apply(whole, dataclasses.replace(CFG, dense_layers=()), compiler="eager", regional=False)
        logits(whole, ids)
    assert len(lhcompile.inspect(whole).rewritten) == 5
