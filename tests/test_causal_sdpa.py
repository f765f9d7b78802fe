"""attn_implementation="causal_sdpa" computes what "sdpa" computes on every call, and calls SDPA with
is_causal=True and no N x N mask only where a call is plainly causal self-attention."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

import lhcompile
from lhcompile import LighthouseConfig, LighthouseWarning

from .models import VOCAB, hf_model, logits

CFG = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=(0, -1))
N = 64


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


def _sdpa_logits(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' own "sdpa" Llama (seed 0) on these positions: what causal_sdpa must give."""
    torch.manual_seed(0)
    with torch.no_grad():
        return hf_model("llama", attention="sdpa").eval()(input_ids=ids, position_ids=positions).logits


def _causal_sdpa_llama(how: str):
    """The same Llama (seed 0) with causal_sdpa, run ``how``: eager, torch.compile, applied, or applied and restored."""
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa").eval()
    torch._dynamo.reset()
    if how == "torch.compile":
        return torch.compile(model, backend="eager")
    if how != "eager":
        lhcompile.apply(model, CFG, compiler="eager")
        if how == "lhcompile.restore":
            lhcompile.restore(model)
    return model


@pytest.mark.parametrize("given", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("how", ["eager", "torch.compile", "lhcompile.apply, eval", "lhcompile.restore"])
def test_causal_sdpa_keeps_packed_documents_apart_in_every_mode(how, given):
    # cu_seq_lens: DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False), where "sdpa"
    # attends across documents; RoPE is relative, so positions that do not restart change nothing within a document
    positions = torch.cat([torch.arange(40), torch.arange(N - 40)])[None].expand(2, -1)  # two packed documents
    cu = torch.tensor([0, 40, N, N + 40, 2 * N], dtype=torch.int32)  # the rows laid end to end
    inputs = dict(position_ids=positions) if given == "position_ids" else dict(
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=N - 40, max_length_k=N - 40)
    ids = torch.randint(0, VOCAB, (2, N))
    want = _sdpa_logits(ids, positions)
    model = _causal_sdpa_llama(how)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", LighthouseWarning)  # nothing is taken on a guess
        got = model(input_ids=ids, **inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["eager", "torch.compile", "lhcompile.apply"])
def test_positions_that_restart_at_one_are_documents_as_for_sdpa(how):
    # a collator that counts positions from 1: transformers' "sdpa" starts a document wherever positions do not go
    # on by one; causal_sdpa, wherever they do not increase: both at each restart
    positions = torch.cat([torch.arange(1, 41), torch.arange(1, N - 39)])[None].expand(2, -1)
    ids = torch.randint(0, VOCAB, (2, N))
    want = _sdpa_logits(ids, positions)
    model = _causal_sdpa_llama(how)
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_causal_sdpa_refuses_two_sets_of_document_boundaries():
    model = hf_model("llama", attention="causal_sdpa").eval()
    cu_q, cu_k = torch.tensor([0, 40, N], dtype=torch.int32), torch.tensor([0, 50, N], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seq_lens_q=\[0, 40, 64\] and cu_seq_lens_k=\[0, 50, 64\]"):
        model(input_ids=torch.randint(0, VOCAB, (1, N)), cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=N,
              max_length_k=N)


@pytest.mark.parametrize("how", ["eager", "torch.compile", "lhcompile.restore", "lhcompile.apply"])
def test_packed_documents_train_under_autocast_with_fp32_weights_as_sdpa_does(how):
    # examples/train.py's setting (fp32 master weights, bf16 autocast): RoPE turns q and k back into fp32 beside a
    # bf16 v. Lighthouse per document and the dense recovery stage of a two-stage run, compiled, used to hand
    # document_attention mixed dtypes (on a GPU its fp32 reference path, a score matrix per document)
    positions = torch.cat([torch.arange(40), torch.arange(N - 40)])[None].expand(2, -1)
    ids = torch.randint(0, VOCAB, (2, N))
    torch.manual_seed(0)
    reference = hf_model("llama", attention="sdpa")
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa")
    torch._dynamo.reset()
    if how == "torch.compile":
        model = torch.compile(model, backend="aot_eager")
    elif how.startswith("lhcompile"):
        lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="aot_eager")
        if how == "lhcompile.restore":
            lhcompile.restore(model)
    results = []
    for m in (reference, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(input_ids=ids, position_ids=positions, labels=ids)
        out.loss.backward()
        results.append((out.logits.float(), [p.grad for p in m.parameters()]))
    (want, want_grads), (got, grads) = results
    if how == "lhcompile.apply":  # Lighthouse in the 40-token document: not dense attention, but trained in bf16
        assert lhcompile.inspect(model).rewritten[0].reason.startswith("lighthouse per document")
        assert got.isfinite().all() and all(g.isfinite().all() for g in grads)
        return
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for mine, ref in zip(grads, want_grads):
        torch.testing.assert_close(mine, ref, rtol=5e-2, atol=5e-3)


def _gemma3_with_images(attention: str) -> torch.nn.Module:
    """Gemma 3 with its vision tower (tiny, random): token_type_ids mark image tokens, which attend to their whole
    image block bidirectionally in its full-attention layers."""
    import transformers

    import lhcompile.integrations.hf  # noqa: F401  (registers attention="causal_sdpa")

    torch.manual_seed(0)
    text = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=None, bos_token_id=None,
        eos_token_id=None, use_cache=False)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=VOCAB - 1)
    config._attn_implementation = config.text_config._attn_implementation = attention
    return transformers.Gemma3ForConditionalGeneration(config)


@pytest.mark.parametrize("how", ["torch.compile", "lhcompile.apply"])
def test_a_bidirectional_image_block_inside_packed_documents_is_kept_under_compile(how):
    # Gemma 3 builds and_masks(or_masks(causal, blockwise_overlay), packed): Dynamo hides the overlay inside
    ids = torch.randint(0, VOCAB - 2, (1, N))
    token_types = torch.zeros(1, N, dtype=torch.long)
    token_types[0, 10:14] = token_types[0, 40:44] = 1  # two images
    positions = torch.cat([torch.arange(30), torch.arange(N - 30)])[None]  # two packed documents
    inputs = dict(input_ids=ids, token_type_ids=token_types, position_ids=positions)
    with torch.no_grad():
        want = _gemma3_with_images("sdpa").eval()(**inputs).logits
    model = _gemma3_with_images("causal_sdpa")
    torch._dynamo.reset()
    if how == "torch.compile":
        with torch.no_grad():
            got = torch.compile(model.eval(), backend="eager")(**inputs).logits
    else:
        lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager")
        with pytest.warns(LighthouseWarning, match="attention sites was rewritten"):
            got = model(**inputs).logits  # training mode: dropout is 0, so the logits are eval's
        reasons = [site.reason for site in lhcompile.inspect(model)]
        # the mask the layers are handed is checked at the call: the image block lets tokens see later ones
        assert len(reasons) == 2 and all("it shows keys after the query (not causal)" in r for r in reasons), reasons
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sliding_window_sites_of_causal_sdpa_stay_dense_under_the_pass():
    torch.manual_seed(0)
    model = hf_model("mistral", attention="causal_sdpa", sliding_window=16)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, N))
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    torch.testing.assert_close(logits(model, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)
    report = lhcompile.inspect(model)
    # the window mask is made outside each layer's graph, and checked at the call: it is the window
    assert not report.rewritten and all("hides keys the causal mask keeps (a sliding window" in s.reason
                                        for s in report.sites), str(report)


def _encoder(kind: str, attention: str) -> torch.nn.Module:
    import transformers

    import lhcompile.integrations.hf  # noqa: F401

    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, max_position_embeddings=128, attn_implementation=attention)
        return transformers.BertModel(cfg)
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                  decoder_ffn_dim=96, max_position_embeddings=128, use_cache=False,
                                  attn_implementation=attention)
    return transformers.BartModel(cfg)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", ["bert", "bart"])
def test_causal_sdpa_leaves_encoders_and_cross_attention_as_sdpa_does(kind, compiled):
    # BERT is an encoder; BART's encoder and its decoder's cross-attention are not causal, its decoder's
    # self-attention is. Equal query and key lengths, no mask: only the module says which is which
    ids = torch.randint(0, VOCAB, (2, 32))
    out, calls = {}, {}
    for attention in ("sdpa", "causal_sdpa"):
        model = _encoder(kind, attention).eval()
        if compiled:
            torch._dynamo.reset()
            model = torch.compile(model, backend="eager")
        extra = {"decoder_input_ids": ids} if kind == "bart" else {}
        with SdpaCalls() as seen, torch.no_grad():
            out[attention] = model(input_ids=ids, **extra).last_hidden_state
        calls[attention] = [causal for causal, _ in seen.calls]
    assert torch.equal(out["sdpa"], out["causal_sdpa"])
    if not compiled:  # a TorchFunctionMode sees the calls eagerly only
        assert calls["causal_sdpa"] == calls["sdpa"]
        assert calls["sdpa"] == ([False] * 2 if kind == "bert" else [False] * 2 + [True, False] * 2)


def test_causal_sdpa_encoder_sites_are_never_rewritten_into_lighthouse():
    model = _encoder("bart", "causal_sdpa")
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    ids = torch.randint(0, VOCAB, (1, N))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)  # tied embeddings: no false "captured in a submodule"
        model(input_ids=ids, decoder_input_ids=ids)
    report = lhcompile.inspect(model)
    rewritten = [s.module_path for s in report.rewritten]
    assert rewritten == ["decoder.layers.0.self_attn", "decoder.layers.1.self_attn"], str(report)
    assert all("not causal" in s.reason for s in report.dense), str(report)
