"""The dilated scorer (``LighthouseConfig(scorer="dilated")``): its scores against a loop-by-loop restatement of the
definition, the operator against the oracle given those scores, per packed document, with RoPE after selection,
under activation checkpointing, through the pass and back; the rules it sets on the configuration."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import lhcompile
from lhcompile import Documents, LighthouseConfig, Rotary, lighthouse_attention
from lhcompile.operator import reference as R
from lhcompile.operator.context_parallel import chunk_config
from lhcompile.operator.documents.layout import Layout
from lhcompile.operator.scorers import SCORERS

from . import naive
from .models import GPT, VOCAB, CheckpointedGPT, logits
from .steps import N, assert_same_training_step
from .test_documents import per_document, qkv, starts_of

DILATED = LighthouseConfig(levels=2, pooling_factor=4, topk=8, tile_budget=4, scorer="dilated", dilation=4,
                           dense_layers=(0, -1))
CONFIGS = [DILATED, LighthouseConfig(levels=3, pooling_factor=2, topk=8, tile_budget=4, scorer="dilated", dilation=2)]


def _scores(config: LighthouseConfig):
    """The definition's pyramids, for the oracle."""
    return lambda q, k, v: naive.dilated_scores(q, k, v, config.levels, config.pooling_factor, config.dilation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 2, 2, 64, 8), (1, 4, 2, 96, 16), (2, 4, 1, 32, 8)],
                         ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("config", CONFIGS, ids=["L2p4d4", "L3p2d2"])
def test_scores_are_the_definitions(config, shape, dtype):
    torch.manual_seed(0)
    b, h, hkv, n, d = shape
    q, k, v = qkv(b, h, hkv, n, d, dtype, grad=False)
    s_qk, s_kq = SCORERS["dilated"].pyramids(q, k, v, config, None, None)
    want_qk, want_kq = _scores(config)(q.double(), k.double(), v.double())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert s_qk.dtype == s_kq.dtype == torch.float32 and s_kq.shape == s_qk.shape == want_qk.shape
    torch.testing.assert_close(s_qk.double(), want_qk, **tol)
    torch.testing.assert_close(s_kq.double(), want_kq, **tol)
    # the norm ranks differently: the scorer is not the norm under another name
    norm_qk, _ = SCORERS["norm"].pyramids(q, k, v, config, None, None)
    assert not torch.equal(s_qk.argsort(-1), norm_qk.argsort(-1))


def test_within_documents_classes_count_from_each_documents_first_token():
    torch.manual_seed(0)
    config = CONFIGS[0]
    n = 64
    q, k, v = qkv(1, 2, 2, n, 8, torch.float32, grad=False)
    starts = torch.zeros(1, n, dtype=torch.bool)
    starts[0, [0, 16, 48]] = True  # as a relaid stream lays documents: each at a multiple of p^(L-1)
    s_qk, s_kq = SCORERS["dilated"].pyramids(q, k, v, config, starts, None)
    want_qk, want_kq = naive.dilated_scores(q.double(), k.double(), v.double(), config.levels,
                                            config.pooling_factor, config.dilation, firsts=[[0, 16, 48]])
    torch.testing.assert_close(s_qk.double(), want_qk, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_kq.double(), want_kq, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=["L2p4d4", "L3p2d2"])
def test_every_relaid_document_begins_a_residue_class(config):
    rows = [[70, 3, 1, 5, 33, 80], [150, 7, 35]]
    layout = Layout.of(starts_of(rows), 2, 192, config)
    begins = layout.relaid_starts[0].nonzero().flatten()
    assert len(begins) == 5 and bool((begins % config.dilation == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=["L2p4d4", "L3p2d2"])
def test_operator_matches_the_oracle_with_the_dilated_scores_forward_and_backward(config, dtype):
    torch.manual_seed(0)
    n = config.min_lighthouse_len * 2 + 8  # padded to whole tiles: the padding must score 0
    q, k, v = qkv(2, 4, 2, n, 16, dtype)
    out = lighthouse_attention(q, k, v, config)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    # fp32: the definition's scores; bf16: the operator's own bf16 scores (checked against the definition above),
    # so that both select the same entries and the rest is held to float64
    if dtype == torch.float32:
        scores = _scores(config)
    else:
        def scores(*_):
            padded = config.padded_len(n)
            pad = [torch.nn.functional.pad(t.detach(), (0, 0, 0, padded - n)) for t in (q, k, v)]
            return (s.double() for s in SCORERS["dilated"].pyramids(*pad, config, None, None))
    q64, k64, v64 = (torch.nn.functional.pad(t.detach().double(), (0, 0, 0, config.padded_len(n) - n)).requires_grad_()
                     for t in (q, k, v))
    want = R.lighthouse_reference(q64, k64, v64, levels=config.levels, p=config.pooling_factor, topk=config.topk,
                                  tile_budget=config.tile_budget, scores=scores)[:, :, :n]
    want_grads = [x[:, :, :n] for x in torch.autograd.grad(want, (q64, k64, v64), g.double())]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    for mine, ref in zip(grads, want_grads):
        torch.testing.assert_close(mine.double(), ref, **tol)
    # and the norm scorer selects otherwise
    norm = lighthouse_attention(q, k, v, dataclasses.replace(config, scorer="norm"))
    assert not torch.allclose(norm, out, rtol=1e-3, atol=1e-3)


def test_packed_documents_get_what_each_gets_alone_and_nothing_crosses_a_boundary():
    torch.manual_seed(0)
    config = CONFIGS[0]  # documents of >= 32 tokens are long
    rows = [[70, 3, 1, 5, 33, 80], [150, 7, 35]]  # starts off multiples of the dilation on purpose
    starts = starts_of(rows)
    q, k, v = qkv(2, 4, 2, 192, 8, torch.float32)
    g = torch.randn(2, 4, 192, 8)

    def run(q, k, v):
        out = lighthouse_attention(q, k, v, config, documents=Documents(starts))
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    before = run(q, k, v)
    alone = per_document(q, k, v, rows, config)
    torch.testing.assert_close(before[0], alone, rtol=1e-5, atol=1e-6)
    for b, start, stop in ((0, 79, 112), (0, 70, 73), (1, 157, 192)):  # a long one, a short one, a row's last
        q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
        for t in (q2, k2, v2):
            t[b, :, start:stop] = torch.randn_like(t[b, :, start:stop]) * 3
        after = run(*(t.requires_grad_() for t in (q2, k2, v2)))
        outside = torch.ones(2, 192, dtype=torch.bool)
        outside[b, start:stop] = False
        for x, y in zip(before, after):
            assert torch.equal(x.transpose(1, 2)[outside], y.transpose(1, 2)[outside]), "another document changed"
        assert not torch.equal(before[0][b, :, start:stop], after[0][b, :, start:stop])


def test_rope_after_selection_scores_the_rotated_query_and_key():
    torch.manual_seed(0)
    config = dataclasses.replace(CONFIGS[0], rope="after_selection")
    n, d = config.min_lighthouse_len * 2, 16
    freqs = 1.0 / (500.0 ** (torch.arange(d // 2) / (d // 2)))
    angles = torch.arange(n).float().unsqueeze(-1) * freqs
    cos, sin = angles.cos(), angles.sin()
    q, k, v = qkv(1, 4, 2, n, d, torch.float32)
    out = lighthouse_attention(q, k, v, config, rope=Rotary.of("complex", cos, sin))

    def rotate(x, positions):
        z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(z * torch.complex(cos[positions].double(), sin[positions].double())).flatten(-2)

    def scores(q, k, v):  # scored as the model's SDPA would see them: rotated at their own positions
        return _scores(config)(rotate(q, torch.arange(n)), rotate(k, torch.arange(n)), v)

    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    want = R.lighthouse_reference(q64, k64, v64, levels=config.levels, p=config.pooling_factor, topk=config.topk,
                                  tile_budget=config.tile_budget, rotate=rotate, scores=scores)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    unrotated = R.lighthouse_reference(q64, k64, v64, levels=config.levels, p=config.pooling_factor,
                                       topk=config.topk, tile_budget=config.tile_budget, rotate=rotate,
                                       scores=_scores(config))
    assert not torch.allclose(unrotated, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("regional", [True, False], ids=["by layer", "whole"])
def test_through_the_pass_checkpointed_or_not_and_restored(regional):
    torch.manual_seed(0)
    model = GPT()
    twin, checkpointed = copy.deepcopy(model), CheckpointedGPT()
    checkpointed.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, N))
    dense = logits(copy.deepcopy(model), ids).detach()
    lhcompile.apply(model, DILATED, compiler="eager", regional=regional)
    assert_same_training_step(model, twin, ids, {1, 2}, DILATED)
    assert [s.index for s in lhcompile.inspect(model).rewritten] == [1, 2]
    # the recomputed forward selects the same entries: gradients equal the plain model's
    lhcompile.apply(checkpointed, DILATED, compiler="eager", regional=regional)
    logits(checkpointed, ids).square().mean().backward()
    for (name, p), (_, c) in zip(model.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(c.grad, p.grad, rtol=1e-6, atol=1e-7, msg=f"gradient of {name}")
    lhcompile.restore(model)
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-6, atol=1e-6)


def test_the_configuration_rules_it_sets():
    with pytest.raises(ValueError, match=r"dilation=3 must be a power of two"):
        LighthouseConfig(scorer="dilated", dilation=3)
    with pytest.raises(ValueError, match=r"dilation=True must be an int"):
        LighthouseConfig(scorer="dilated", dilation=True)
    with pytest.raises(ValueError, match=r"dilation=8 must divide p\^\(L-1\) = 4"):
        LighthouseConfig(levels=2, pooling_factor=4, scorer="dilated", dilation=8)
    LighthouseConfig(levels=2, pooling_factor=4, dilation=8)  # the norm scorer reads no dilation
    with pytest.raises(ValueError, match="use scorer='norm' under context parallelism"):
        chunk_config(DILATED)
