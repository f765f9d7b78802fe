"""Small models with SDPA attention, built from configs with random weights (nothing is downloaded)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lhcompile.passes import SDPA_PARAMS, bind_arguments

VOCAB = 97


def hf_model(kind: str, layers: int = 4, attention: str = "sdpa", **extra) -> nn.Module:
    """Hugging Face causal LMs with GQA, SDPA attention, no KV cache: Llama, Qwen2, Qwen3, Mistral, Gemma 3, Phi
    (partial rotary), Cohere (RoPE on adjacent pairs)."""
    import transformers

    import lhcompile.integrations.hf  # noqa: F401  (registers attention="causal_sdpa")

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "phi": (transformers.PhiConfig, transformers.PhiForCausalLM),
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM),
    }[kind]
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        attn_implementation=attention,
        use_cache=False,
        **({"pad_token_id": None, "bos_token_id": None, "eos_token_id": None} | extra),
    )
    return model_cls(cfg)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchtitan's (and Meta's Llama's) RoPE: adjacent pairs of (B, N, H, d) rotated as complex numbers."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out, xk_out = (torch.view_as_real(x * freqs_cis).flatten(3) for x in (xq_, xk_))
    return xq_out.type_as(xq), xk_out.type_as(xk)


def apply_rotary_pairs(xq: torch.Tensor, xk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rotation written out on adjacent pairs with real tables (N, d/2), as ChatGLM does."""
    cos, sin = (t.view(1, t.shape[0], 1, t.shape[1]) for t in (cos, sin))

    def rotate(x):
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return rotate(xq), rotate(xk)


class TitanAttention(nn.Module):
    """torchtitan-style Llama-3 attention: complex RoPE in (B, N, H, d) layout (or the same on pairs written out,
    ``rope="pairs"``), then GQA through SDPA's enable_gqa."""

    def __init__(self, dim: int, heads: int, kv_heads: int, max_len: int = 512, rope: str = "complex") -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.rope = heads, kv_heads, dim // heads, rope
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        freqs = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        angles = torch.outer(torch.arange(max_len).float(), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.heads, self.head_dim)
        k = self.wk(x).view(b, n, self.kv_heads, self.head_dim)
        v = self.wv(x).view(b, n, self.kv_heads, self.head_dim)
        if self.rope == "complex":
            q, k = apply_rotary_emb(q, k, self.freqs_cis[:n])
        else:
            q, k = apply_rotary_pairs(q, k, self.freqs_cis[:n].real, self.freqs_cis[:n].imag)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class TitanBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, rope: str = "complex") -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.attention = TitanAttention(dim, heads, kv_heads, rope=rope)
        self.w1, self.w2, self.w3 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(2 * dim, dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class TitanLlama3(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, rope: str = "complex"
                 ) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleDict({str(i): TitanBlock(dim, heads, kv_heads, rope) for i in range(layers)})
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


class GPTBlock(nn.Module):
    """Hand-written GPT-2 block: fused qkv projection, keyword-argument SDPA call."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True, scale=1 / math.sqrt(c // self.heads))
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 4, heads: int = 4, max_len: int = 512) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList([GPTBlock(dim, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


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


class EmbeddingAttention(nn.Module):
    """Attention with the token embeddings themselves as q, k and v: no arithmetic runs before SDPA, so every
    compiler and every sharding hands it (and Lighthouse's selection) the same bits, even in bf16."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = x.view(b, n, self.heads, c // self.heads).transpose(1, 2)
        return x + self.proj(F.scaled_dot_product_attention(h, h, h, is_causal=True).transpose(1, 2).reshape(b, n, c))


class EmbeddingAttentionLM(nn.Module):
    """EmbeddingAttention, then a GPT-2 block; no position embeddings, so a sequence shards without positions."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList([EmbeddingAttention(dim, heads), GPTBlock(dim, heads)])
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


MODELS = {
    "llama": lambda: hf_model("llama"),
    "qwen2": lambda: hf_model("qwen2"),
    "mistral": lambda: hf_model("mistral"),
    "titan": TitanLlama3,
    "gpt": GPT,
}


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


class SdpaAt(TorchFunctionMode):
    """Runs a model's own code, sending its SDPA calls numbered in ``sites`` (in call order) to
    ``attention(q, k, v, scale)`` instead."""

    def __init__(self, sites: set[int], attention) -> None:
        super().__init__()
        self.sites, self.attention, self.count = sites, attention, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            i, self.count = self.count, self.count + 1
            if i in self.sites:
                a = bind_arguments(func, args, kwargs, SDPA_PARAMS)
                return self.attention(a["query"], a["key"], a["value"], a["scale"])
        return func(*args, **kwargs)


class NanoGPTBlock(nn.Module):
    """nanoGPT's attention with its causal mask kept as a lower-triangular buffer and sliced to the sequence, or a
    learned additive bias per head (``mask="bias"``); optionally a graph break before the attention."""

    def __init__(self, dim: int, heads: int, mask: str = "buffer", graph_break: bool = False, max_len: int = 512
                 ) -> None:
        super().__init__()
        self.heads, self.mask, self.graph_break = heads, mask, graph_break
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)).view(1, 1, max_len, max_len))
        self.learned = nn.Parameter(torch.randn(heads, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if self.graph_break:
            torch._dynamo.graph_break()
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        mask = self.bias[:, :, :n, :n] if self.mask == "buffer" else self.learned.expand(self.heads, n, n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.proj(y.transpose(1, 2).reshape(b, n, c))


class NanoGPT(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 4, heads: int = 4, **block) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.h = nn.ModuleList([NanoGPTBlock(dim, heads, **block) for _ in range(layers)])
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.head(x)


def hf_rotation(kind: str):
    """A transformers model's own apply_rotary_pos_emb as rotate(rows (B, H, M, d), positions (M,)), for its
    tables (B, N, r): ``hf_rotation(kind)(cos, sin)``; rows past r are left as they are (partial rotary)."""
    import importlib

    apply = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}").apply_rotary_pos_emb

    def make(cos, sin):
        def rotate(x, positions):
            r = cos.shape[-1]
            c, s = (t[:, positions].to(x.dtype) for t in (cos, sin))
            return torch.cat([apply(x[..., :r], x[..., :r], c, s)[0], x[..., r:]], dim=-1)
        return rotate
    return make


class RopeMoved(TorchFunctionMode):
    """Runs a model's own code with its RoPE function (``module.<name>(q, k, *tables_args)``) returning q and k
    unrotated, and every SDPA call given those: site i in ``lighthouse`` goes to ``lighthouse[i](q, k, v, scale,
    rotate, tables)``, the others to SDPA on q and k rotated as the model would. ``tables(*tables_args)`` are the
    call's tables, ``rotation(*tables)`` the model's rotation as ``rotate(rows, positions)``. One RoPE call per SDPA
    call, in order."""

    def __init__(self, module, name: str, tables, rotation, lighthouse: dict) -> None:
        super().__init__()
        self.module, self.name, self.tables, self.rotation, self.lighthouse = module, name, tables, rotation, lighthouse
        self.calls, self.count = [], 0

    def __enter__(self):
        self.original = getattr(self.module, self.name)

        def unrotated(q, k, *args, **kwargs):
            self.calls.append(self.tables(*args, **kwargs))
            return q, k
        setattr(self.module, self.name, unrotated)
        return super().__enter__()

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        a = bind_arguments(func, args, kwargs, SDPA_PARAMS)
        q, k, v, scale = a["query"], a["key"], a["value"], a["scale"]
        site, self.count = self.count, self.count + 1
        rotate = self.rotation(*self.calls[site])
        if site in self.lighthouse:
            return self.lighthouse[site](q, k, v, scale, rotate, self.calls[site])
        positions = torch.arange(q.shape[2], device=q.device)
        return F.scaled_dot_product_attention(rotate(q, positions), rotate(k, positions), v, is_causal=True,
                                              scale=scale, enable_gqa=q.shape[1] != k.shape[1])
