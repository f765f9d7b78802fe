"""The same model layer by layer and whole: ``apply``'s default (layers compiled on their own) rewrites the sites
that compiling the model whole rewrites, with ``dense_layers`` counting the model's attention sites in execution
order either way, whatever holds the layers (nanoGPT's ModuleDict beside its embeddings, Musicgen's lists of
codebook embeddings and heads, a stack that calls one layer twice, a hybrid stack that attends in one layer of
four); and the report has one true row per site."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lhcompile
from lhcompile import LighthouseConfig, LighthouseWarning, lighthouse_attention

from .models import VOCAB, SdpaAt, hf_model, logits

CFG = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=(0, -1))
N = 64


class Attention(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, dropout=dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NanoGPT(nn.Module):
    """karpathy's nanoGPT layout: embeddings, dropout, the block list and the final norm in one ModuleDict."""

    def __init__(self, layers: int = 4, dim: int = 64) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(VOCAB, dim), wpe=nn.Embedding(512, dim), drop=nn.Dropout(0.0),
            h=nn.ModuleList([Block(dim) for _ in range(layers)]), ln_f=nn.LayerNorm(dim)))
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        x = t.drop(t.wte(idx) + t.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


class _Stack(nn.Module):
    """Embedding, ``layers`` in order, head."""

    def __init__(self, layers: list[nn.Module], dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Shared(_Stack):
    """A stack that calls each of two layer objects twice ([a, b, a, b]: weight sharing across depth)."""

    def __init__(self, dim: int = 64) -> None:
        a, b = Block(dim), Block(dim)
        super().__init__([a, b, a, b], dim)


class Mixer(nn.Module):
    """A layer that mixes tokens without attention (a stand-in for a state-space layer)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.norm, self.mix = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.norm(x))
        return x + torch.cumsum(h, dim=1) / torch.arange(1, x.shape[1] + 1, device=x.device)[:, None]


class Hybrid(_Stack):
    """A Jamba-like stack: mixer layers, attention in every fourth."""

    def __init__(self, layers: int = 12, dim: int = 64) -> None:
        super().__init__([Block(dim) if i % 4 == 3 else Mixer(dim) for i in range(layers)], dim)


def musicgen() -> nn.Module:
    """HF's Musicgen decoder: ModuleLists of codebook embeddings and heads beside its decoder layers."""
    import transformers

    cfg = transformers.MusicgenDecoderConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                                             num_attention_heads=4, ffn_dim=96, num_codebooks=2,
                                             dropout=0.0, attn_implementation="sdpa", pad_token_id=None,
                                             bos_token_id=None)
    return transformers.MusicgenForCausalLM(cfg)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def _run(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = logits(model, ids)
    grads = torch.autograd.grad(_loss(out), [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return out.detach(), grads


MODELS = {
    "nanoGPT": (NanoGPT, lambda: torch.randint(0, VOCAB, (2, N))),
    "musicgen": (musicgen, lambda: torch.randint(0, VOCAB, (4, N))),  # (batch x codebooks, length)
    "shared [a, b, a, b]": (Shared, lambda: torch.randint(0, VOCAB, (2, N))),
    "hybrid": (Hybrid, lambda: torch.randint(0, VOCAB, (2, N))),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_layer_by_layer_and_whole_rewrite_the_same_sites_and_train_the_same(name):
    factory, inputs = MODELS[name]
    torch.manual_seed(0)
    reference = factory()
    ids = inputs()
    # what dense_layers=(0, -1) means: the model's first and last attention calls stay dense
    with SdpaAt(set(), lambda *a: None) as count:
        logits(reference, ids)
    sites = set(range(1, count.count - 1))
    with SdpaAt(sites, lambda q, k, v, scale: lighthouse_attention(q, k, v, CFG, scale=scale)):
        want, want_grads = _run(reference, ids)
    rows = {}
    for regional in (True, False):
        torch._dynamo.reset()
        model = copy.deepcopy(reference)
        lhcompile.apply(model, CFG, compiler="eager", regional=regional)
        with warnings.catch_warnings():
            warnings.simplefilter("error", LighthouseWarning)  # nothing to say: every layer is where it belongs
            got, grads = _run(model, ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"logits, regional={regional}")
        for mine, ref in zip(grads, want_grads):
            if ref is not None:
                torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
        report = lhcompile.inspect(model)
        rows[regional] = [(s.index, s.module_path, s.rewritten) for s in report]
        assert [s.index for s in report.rewritten] == sorted(sites), str(report)
    assert rows[True] == rows[False]


def test_a_layer_called_twice_runs_each_call_at_its_own_place():
    torch.manual_seed(0)
    model = Shared()
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=(0,)), compiler="eager")
    logits(model, torch.randint(0, VOCAB, (1, N)))
    # layers.0 and layers.2 are one object: dense at its first call, Lighthouse at its second
    assert [(s.index, s.module_path, s.rewritten) for s in lhcompile.inspect(model)] == [
        (0, "layers.0.attn", False), (1, "layers.1.attn", True), (2, "layers.0.attn", True),
        (3, "layers.1.attn", True)], str(lhcompile.inspect(model))


def test_the_report_has_one_true_row_per_site():
    # Qwen2 with sliding-window layers mixed with full ones (max_window_layers): transformers hands the two kinds of
    # layer other masks, so one kind of layer has two graphs; each site is listed once, as its own graph left it
    torch.manual_seed(0)
    model = hf_model("qwen2", layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    logits(model, torch.randint(0, VOCAB, (1, N)))
    report = lhcompile.inspect(model)
    assert [(s.index, s.rewritten) for s in report] == [(0, True), (1, True), (2, False), (3, False)], str(report)
    assert len({s.graph for s in report}) == 2  # the full layers' graph and the windowed layers' graph
    for site in report.dense:  # the window is named as what it is, not as "a mask computed from the inputs"
        assert site.reason.startswith("explicit attn_mask is not the causal mask: it hides keys the causal mask "
                                      "keeps (a sliding window"), site.reason


def test_dropout_in_one_layer_is_reported_for_that_layer_alone():
    torch.manual_seed(0)
    model = NanoGPT()
    model.transformer.h[1].attn.dropout = 0.1
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    logits(model, torch.randint(0, VOCAB, (1, N)))
    report = lhcompile.inspect(model)
    assert len(report) == 4
    assert [("dropout_p=0.1" in s.reason) for s in report] == [False, True, False, False], str(report)
    assert [s.rewritten for s in report] == [True, False, True, True]


def test_sites_of_one_sdpa_call_per_layer_are_as_many_rows_as_calls():
    model = hf_model("llama", layers=3)
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    for n in (N, N + 16):  # a second length: new graphs for the same sites
        logits(model, torch.randint(0, VOCAB, (1, n)))
    model.eval()
    with torch.no_grad():
        logits(model, torch.randint(0, VOCAB, (1, N)))
    report = lhcompile.inspect(model)
    assert [(s.training, s.index) for s in report] == [(True, 0), (True, 1), (True, 2), (False, 0), (False, 1),
                                                         (False, 2)], str(report)


def _falcon(**extra) -> nn.Module:
    import transformers

    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    attn_implementation="sdpa", use_cache=False, **extra)
    return transformers.FalconForCausalLM(cfg)


def test_a_causal_mask_made_outside_the_layers_runs_lighthouse_layer_by_layer():
    # Falcon's own code always builds its mask and hands it to every layer: checked at each call, it is the causal
    # mask, so the layers run Lighthouse as the model compiled whole does
    torch.manual_seed(0)
    reference = _falcon(new_decoder_architecture=True, num_kv_heads=2, alibi=False)
    ids = torch.randint(0, VOCAB, (2, N))
    outs = {}
    for regional in (True, False):
        torch._dynamo.reset()
        model = copy.deepcopy(reference)
        lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager", regional=regional)
        with warnings.catch_warnings():
            warnings.simplefilter("error", LighthouseWarning)
            outs[regional] = logits(model, ids)
        report = lhcompile.inspect(model)
        assert len(report.rewritten) == 3, str(report)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)
    # a padded batch hands the layers a mask that is not causal: those calls keep the model's own call, dense
    model = copy.deepcopy(reference)
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    logits(model, ids)
    padding = torch.ones(2, N, dtype=torch.long)
    padding[1, :8] = 0
    got = model(input_ids=ids, attention_mask=padding).logits
    with torch.no_grad():
        torch.testing.assert_close(got, reference(input_ids=ids, attention_mask=padding).logits, rtol=1e-5, atol=1e-5)
    assert all("is not the causal mask" in s.reason for s in lhcompile.inspect(model)), str(lhcompile.inspect(model))


@pytest.mark.parametrize("case", ["alibi", "sliding window"])
def test_masks_that_are_not_causal_are_called_what_they_are(case):
    import transformers

    if case == "alibi":
        model, said = _falcon(alibi=True), "adds finite biases (a position bias such as ALiBi)"
    else:
        cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                                         attn_implementation="sdpa", use_cache=False)
        model, said = transformers.MistralForCausalLM(cfg), "hides keys the causal mask keeps (a sliding window"
    for regional in (True, False):
        torch._dynamo.reset()
        applied = copy.deepcopy(model)
        lhcompile.apply(applied, dataclasses.replace(CFG, dense_layers=()), compiler="eager", regional=regional)
        with pytest.warns(LighthouseWarning, match="attention sites was rewritten"):
            logits(applied, torch.randint(0, VOCAB, (1, N)))
        report = lhcompile.inspect(applied)
        assert report and all(said in s.reason for s in report), str(report)
        assert not any("computed from the graph's inputs" in s.reason for s in report), str(report)


def test_under_cpu_autocast_the_rewritten_site_computes_what_lighthouse_attention_does():
    # SDPA's semantics in an autocast region: q, k and v in the region's dtype, also for selection, where the model
    # keeps fp32 weights (its q and k come out of fp32 rotations)
    torch.manual_seed(0)
    model = hf_model("llama")
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, N))
    lhcompile.apply(model, CFG, compiler="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logits(model, ids)
        with SdpaAt({1, 2}, lambda q, k, v, scale: lighthouse_attention(q, k, v, CFG, scale=scale)):
            want = logits(twin, ids)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert (got.float() - want.float()).abs().mean() < 2e-3


class BroadcastKV(nn.Module):
    """Attention whose keys and values are shared by every row of the batch (a batch of one, which SDPA
    broadcasts): e.g. a learned memory of tokens."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.memory = nn.Parameter(torch.randn(1, heads, N, dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        return F.scaled_dot_product_attention(q, self.memory, self.memory, is_causal=True).transpose(1, 2)


def test_keys_and_values_broadcast_over_the_batch_are_broadcast_by_the_rewrite_too():
    torch.manual_seed(0)
    model = BroadcastKV()
    x = torch.randn(2, N, 64)
    want = lighthouse_attention(model.q(x).view(2, N, 4, 16).transpose(1, 2), model.memory.expand(2, -1, -1, -1),
                                model.memory.expand(2, -1, -1, -1), CFG).transpose(1, 2)
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)
    [site] = lhcompile.inspect(model)
    assert site.rewritten, str(lhcompile.inspect(model))
