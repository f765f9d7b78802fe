"""What the pass cannot do, or does on a guess, is said: a model left dense, a mode taken from grad mode, attention
the pass does not know, masks proven causal from buffers or called what they are, a graph break, a dynamic length,
attention outside the layers; and the path where all goes well stays quiet."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

import lhcompile
from lhcompile import LighthouseConfig, LighthouseWarning

from .models import GPT, VOCAB, NanoGPT, logits
from .steps import CFG, N, assert_same_training_step, captured, lighthouse_at


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


def test_the_quiet_path_stays_quiet():
    # a model that gets its Lighthouse sites rewritten and is then restored raises no warning at all
    model = GPT()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        lhcompile.apply(model, CFG, compiler="eager")
        logits(model, torch.randint(0, VOCAB, (1, N)))
        lhcompile.restore(model)


def test_a_sliced_lower_triangular_buffer_is_proven_causal_and_the_assumption_said():
    torch.manual_seed(0)
    model = NanoGPT()
    twin = copy.deepcopy(model)
    n = 5 * N  # no weight or activation dimension is n
    ids = torch.randint(0, VOCAB, (2, n))
    with pytest.warns(LighthouseWarning, match=r"module buffer\(s\) .* was proven") as record:
        graphs = captured(model, CFG, ids)
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

