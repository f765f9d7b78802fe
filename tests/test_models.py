"""apply / restore on real model families: HF Llama, Qwen2, Mistral (GQA), a torchtitan-style Llama-3, a GPT."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lhcompile
from lhcompile import LighthouseConfig, lighthouse_attention

from .models import MODELS, VOCAB, SdpaAt, logits

CFG = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=(0, -1))
N = 64
LAYERS = 4


def LighthouseAt(sites: set[int]) -> SdpaAt:
    """The model's own code with the SDPA calls numbered in ``sites`` sent to lighthouse_attention."""
    return SdpaAt(sites, lambda q, k, v, scale: lighthouse_attention(q, k, v, CFG, scale=scale))


def _pair(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    twin = copy.deepcopy(model)
    return model, twin


def _step(model, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = logits(model, ids)
    loss = F.cross_entropy(out[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    opt.zero_grad()
    return out, loss, before


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_trains_eagerly_and_matches_lighthouse_semantics(name):
    model, twin = _pair(name)
    ids = torch.randint(0, VOCAB, (2, N))
    keys = list(model.state_dict())
    lhcompile.apply(model, CFG, compiler="eager")
    out, loss, before = _step(model, ids)
    report = lhcompile.inspect(model)
    assert [s.index for s in report.rewritten] == [1, 2], str(report)
    assert len(report.sites) == LAYERS and all(s.reason.startswith("dense layer") for s in report.dense)
    # same numbers as the model's own code with those two SDPA calls replaced by the functional operator
    with LighthouseAt({1, 2}):
        want = logits(twin, ids)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, logits(twin, ids), atol=1e-3), "Lighthouse did not change the attention"
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "a parameter got no update"
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("name", ["llama"])  # Inductor is the subject: HF's in-graph mask, GQA through enable_gqa
def test_training_step_under_inductor(name):
    model, twin = _pair(name)
    ids = torch.randint(0, VOCAB, (2, N))
    lhcompile.apply(model, CFG)  # compiler="inductor" by default
    out, loss, _ = _step(model, ids)
    assert len(lhcompile.inspect(model).rewritten) == 2
    with LighthouseAt({1, 2}):
        want = logits(twin, ids)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(loss)
    # a later torch.compile(model) must not silently drop the rewrite
    compiled = torch.compile(model)
    twin.load_state_dict(model.state_dict())
    with LighthouseAt({1, 2}):
        want = logits(twin, ids)
    torch.testing.assert_close(logits(compiled, ids), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_restore_gives_the_untouched_models_logits(name):
    model, twin = _pair(name)
    ids = torch.randint(0, VOCAB, (2, N))
    lhcompile.apply(model, CFG, compiler="eager")
    logits(model, ids)
    assert lhcompile.restore(model) is model
    assert torch.equal(logits(model, ids), logits(twin, ids))
    assert lhcompile.inspect(model).state == "restored"  # what the pass did before, said as such
    # and the checkpoint loads into the untouched class
    twin.load_state_dict(model.state_dict(), strict=True)


def test_sequences_too_short_stay_dense_and_say_so():
    model, twin = _pair("titan")
    ids = torch.randint(0, VOCAB, (1, 12))  # CFG needs N >= 16
    lhcompile.apply(model, CFG, compiler="eager")
    assert torch.equal(logits(model, ids), logits(twin, ids))
    reasons = {s.reason for s in lhcompile.inspect(model).dense}
    assert "sequence too short: N=12 < min_lighthouse_len=16" in reasons


def test_eval_mode_uses_dense_attention():
    model, twin = _pair("gpt")
    ids = torch.randint(0, VOCAB, (1, N))
    lhcompile.apply(model.eval(), CFG, compiler="eager")
    assert torch.equal(logits(model, ids), logits(twin.eval(), ids))
    assert all("eval mode" in s.reason for s in lhcompile.inspect(model).sites)


def test_filter_fn_and_dense_layers_choose_sites_by_module_path():
    model, _ = _pair("llama")
    cfg = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=())
    lhcompile.apply(model, cfg, compiler="eager", filter_fn=lambda path: not path.endswith("layers.2.self_attn"))
    logits(model, torch.randint(0, VOCAB, (1, N)))
    report = lhcompile.inspect(model)
    assert [s.module_path for s in report.rewritten] == [f"model.layers.{i}.self_attn" for i in (0, 1, 3)]
    # compiled layer by layer, the layers get transformers' plain causal call (no mask), which stays as it is
    assert report.dense[0].reason == "excluded by filter_fn"


def test_apply_is_idempotent_and_restore_of_untouched_model_warns():
    model, _ = _pair("gpt")
    lhcompile.apply(model, CFG, compiler="eager")
    with pytest.warns(UserWarning, match="nothing new"):
        lhcompile.apply(model, CFG, compiler="eager")
    with pytest.raises(ValueError, match="restore"):
        lhcompile.apply(model, LighthouseConfig(), compiler="eager")
    lhcompile.restore(model)
    with pytest.warns(UserWarning, match="nothing to restore"):
        lhcompile.restore(model)


def test_debug_mode_writes_graph_code_and_site_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LHCOMPILE_DEBUG", "1")
    monkeypatch.setenv("LHCOMPILE_DEBUG_DIR", str(tmp_path))
    model, _ = _pair("titan")
    lhcompile.apply(model, CFG, compiler="eager")
    logits(model, torch.randint(0, VOCAB, (1, N)))
    # graph 0 serves every layer: rewritten with Lighthouse for layers 1 and 2, dense for layers 0 and 3
    after = (tmp_path / "graph0_after.py").read_text()
    dense = (tmp_path / "graph0_after_dense.py").read_text()
    before = (tmp_path / "graph0_before.py").read_text()  # its source comments may name a folder 'lhcompile'
    for stage in ("lhcompile.score", "lhcompile.select", "lhcompile.gather", "lhcompile.scatter"):
        assert stage in after and stage not in before and stage not in dense
    table = (tmp_path / "sites.txt").read_text()
    assert "2 of 4 attention sites rewritten" in table and "layers.1.attention" in table
    assert "2 of 4 attention sites rewritten" in capsys.readouterr().err


@pytest.mark.parametrize("regional", [True, False], ids=["by-layer", "whole"])
def test_a_deep_model_compiles_one_graph_per_kind_of_layer_and_trains_the_same(regional):
    from .models import GPT

    torch.manual_seed(0)
    model = GPT(layers=12)
    twin = copy.deepcopy(model)
    config = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=(0, 1, -2, -1))
    lhcompile.apply(model, config, compiler="eager", regional=regional)
    ids = torch.randint(0, VOCAB, (2, N))
    out = logits(model, ids)
    report = lhcompile.inspect(model)
    # by layer: one graph captured serves all 12 layers, compiled for the dense layers and for the Lighthouse ones
    assert (report.graphs, report.compiled) == ((1, 2) if regional else (1, 1))
    assert [s.index for s in report.rewritten] == list(range(2, 10)), str(report)
    with SdpaAt(set(range(2, 10)), lambda q, k, v, scale: lighthouse_attention(q, k, v, config, scale=scale)):
        want = logits(twin, ids)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    lhcompile.restore(model)
    assert torch.equal(logits(model, ids), logits(twin, ids))
