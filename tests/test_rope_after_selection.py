"""RoPE after selection (LighthouseConfig(rope="after_selection")): the operator against the oracle, and the pass
on models with different RoPE forms against the models' own code run with the oracle."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import lhcompile
from lhcompile import LighthouseConfig, LighthouseWarning, Rotary, lighthouse_attention
from lhcompile.operator import kernels
from lhcompile.operator import reference as R
from lhcompile.operator.context_parallel import cp_reference
from lhcompile.operator.rotary import entry_positions

from . import models, naive
from .models import GPT, VOCAB, RopeMoved, TitanLlama3, hf_model, hf_rotation, logits

CFG = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=(0, -1), rope="after_selection")
CONFIGS = [LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4),
           LighthouseConfig(levels=3, pooling_factor=4, topk=16, tile_budget=4)]


def _tables(n: int, width: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles of a long-context RoPE, plus a per-sequence shift so that batch rows differ."""
    freqs = 1.0 / (500.0 ** (torch.arange(width) / width))
    pos = torch.arange(n).float() + 17.0 * torch.arange(batch).view(batch, 1)
    angles = pos.unsqueeze(-1) * freqs
    return angles.cos(), angles.sin()


def _complex_rotation(cos, sin):
    """torchtitan's complex RoPE as the oracle's rotate, for tables (B, N, d/2)."""
    def rotate(x, positions):
        z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
        w = torch.complex(cos[:, positions].double(), sin[:, positions].double()).unsqueeze(1)
        return torch.view_as_real(z * w).flatten(-2).to(x.dtype)
    return rotate


def _pyramid(t, cfg, rotate):
    if rotate is None:
        return t, R.pool(t, cfg.levels, cfg.pooling_factor)
    return R.rotated_pyramid(t, cfg.levels, cfg.pooling_factor, rotate)


FORMS = {"rotate_half": (hf_rotation("llama"), 1), "rotate_pairs": (hf_rotation("cohere"), 1),
         "complex": (_complex_rotation, 2), "pairs": (_complex_rotation, 2)}


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operator_matches_the_oracle_forward_and_backward(cfg, form, dtype):
    torch.manual_seed(0)
    n, d, partial = cfg.min_lighthouse_len * 2, 16, 12 if form == "rotate_half" else 16
    make_rotation, shrink = FORMS[form]
    cos, sin = _tables(n, partial // shrink, batch=2)
    q, k, v = (torch.randn(2, h, n, d, dtype=dtype, requires_grad=True) for h in (4, 2, 2))
    rope = Rotary.of(form, cos.to(dtype), sin.to(dtype), head_dim=d)
    out = lighthouse_attention(q, k, v, dataclasses.replace(cfg, rope="after_selection"), rope=rope)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = R.lighthouse_reference(q64, k64, v64, levels=cfg.levels, p=cfg.pooling_factor, topk=cfg.topk,
                                  tile_budget=cfg.tile_budget, rotate=make_rotation(cos.double(), sin.double()))
    want_grads = torch.autograd.grad(want, (q64, k64, v64), g.double())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    for mine, ref in zip(grads, want_grads):
        torch.testing.assert_close(mine.double(), ref, **tol)
    # the order matters: the paper's order on the same inputs, rotated first, is something else
    rotate = make_rotation(cos.double(), sin.double())
    paper = R.lighthouse_reference(*(rotate(t, torch.arange(n)) for t in (q64, k64)), v64, levels=cfg.levels,
                                   p=cfg.pooling_factor, topk=cfg.topk, tile_budget=cfg.tile_budget)
    assert not torch.allclose(paper, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_entries_are_rotated_at_the_last_token_they_cover_and_positions_never_decrease(cfg):
    torch.manual_seed(1)
    n = cfg.min_lighthouse_len * 2
    pyramid = R.level_offsets(n, cfg.levels, cfg.pooling_factor)[-1]
    s_qk, s_kq = torch.rand(2, 4, pyramid), torch.rand(2, 2, pyramid)
    index = R.cascade(s_qk, s_kq, n, cfg.levels, cfg.pooling_factor, cfg.topk, cfg.tile_budget)
    positions = entry_positions(index, n, cfg.levels, cfg.pooling_factor)
    spec = naive.select(s_qk, s_kq, n, cfg.levels, cfg.pooling_factor, cfg.topk, cfg.tile_budget)
    for b, row in enumerate(spec):
        for h, entries in enumerate(row):
            want = [(i + 1) * cfg.pooling_factor**lvl - 1 for lvl, i in entries]
            assert positions[b, h].tolist() == want
    assert bool((positions.diff(dim=-1) >= 0).all())


def test_context_parallel_chunks_rotate_at_global_positions():
    # cp_reference (what every rank's shard must equal) against its statement: per chunk of c tokens its own
    # selection, every pyramid entry rotated at the global position of its last token, i * c + (j+1)·p^l − 1
    torch.manual_seed(2)
    cfg, world, n, d = dataclasses.replace(CONFIGS[0], topk=16), 2, 128, 8
    half, chunk = dataclasses.replace(cfg, topk=8), n // (2 * world)
    cos, sin = _tables(n, d)
    q, k, v = (torch.randn(1, h, n, d, dtype=torch.float64) for h in (2, 1, 1))
    got = cp_reference(q, k, v, cfg, world, rope=Rotary.of("rotate_half", cos, sin))
    rows, selections = [], []
    for i in range(2 * world):
        qc, kc, vc = (t[:, :, i * chunk:(i + 1) * chunk] for t in (q, k, v))
        index = R.cascade(*R.score(qc, kc, half.levels, half.pooling_factor), chunk, half.levels, half.pooling_factor,
                          half.topk, half.tile_budget)
        rotate = hf_rotation("llama")(cos[:, i * chunk:], sin[:, i * chunk:])
        rows.append([R.take(*_pyramid(t, half, None if t is vc else rotate), index) for t in (qc, kc, vc)])
        selections.append(index)
    o = F.scaled_dot_product_attention(*(torch.cat(parts, dim=2) for parts in zip(*rows)), is_causal=True,
                                       enable_gqa=True)
    s = half.gathered_len(chunk)
    want = torch.cat([R.scatter(o[:, :, i * s:(i + 1) * s], index, None, chunk, half.levels, half.pooling_factor)
                      for i, index in enumerate(selections)], dim=2)
    torch.testing.assert_close(got, want)


def test_short_sequences_run_dense_attention_on_rotated_q_and_k():
    n, d = 8, 16
    cos, sin = _tables(n, d)
    q, k, v = (torch.randn(1, 2, n, d) for _ in range(3))
    out = lighthouse_attention(q, k, v, CFG, rope=Rotary.of("rotate_half", cos, sin))
    rotate = hf_rotation("llama")(cos, sin)
    want = F.scaled_dot_product_attention(rotate(q, torch.arange(n)), rotate(k, torch.arange(n)), v, is_causal=True)
    torch.testing.assert_close(out, want)


def test_tables_that_do_not_fit_are_refused_saying_what_to_pass():
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match=r"rope=lhcompile.Rotary.of"):
        lighthouse_attention(q, q, q, CFG)
    with pytest.raises(ValueError, match=r"tables of 32 positions for a sequence of 64"):
        lighthouse_attention(q, q, q, CFG, rope=Rotary.of("rotate_half", *_tables(32, 8)))
    with pytest.raises(ValueError, match=r"rotary_dim=12 of head_dim=12 .* must be q's \(8\)"):
        lighthouse_attention(q, q, q, CFG, rope=Rotary.of("rotate_half", *_tables(64, 12)))


# -- the pass on models: their own code, with RoPE moved after selection by the oracle, is what apply must give --


def _hf(kind: str, **extra):
    model = hf_model(kind, attention="causal_sdpa", **extra)
    module = importlib.import_module(type(model).__module__)
    return model, module, "apply_rotary_pos_emb", lambda cos, sin, *a, **kw: (cos, sin), hf_rotation(kind)


def _titan(rope: str):
    def tables(*freqs):  # freqs_cis, or its real and imaginary parts
        pair = (freqs[0].real, freqs[0].imag) if rope == "complex" else freqs
        return tuple(t.unsqueeze(0) for t in pair)
    name = "apply_rotary_emb" if rope == "complex" else "apply_rotary_pairs"
    return TitanLlama3(rope=rope), models, name, tables, _complex_rotation


CASES = {
    "llama-rotate_half-checkpointed": lambda: _hf("llama"),
    "phi-partial": lambda: _hf("phi", partial_rotary_factor=0.5),
    "cohere-rotate_pairs": lambda: _hf("cohere"),
    "torchtitan-complex": lambda: _titan("complex"),
    "chatglm-style-pairs": lambda: _titan("pairs"),
}


@pytest.mark.parametrize("case", CASES)
def test_models_match_their_own_code_with_rope_moved_after_selection(case):
    torch.manual_seed(0)
    model, module, name, tables, rotation = CASES[case]()
    twin, paper = copy.deepcopy(model), copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 65))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    model.train(), twin.train(), paper.train()
    if case.endswith("checkpointed"):  # each layer recomputed in the backward pass, the rotated gather included
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    lhcompile.apply(model, CFG, compiler="eager")
    got = logits(model, inputs)
    F.cross_entropy(got.flatten(0, 1), labels.flatten()).backward()
    report = lhcompile.inspect(model)
    assert [s.index for s in report.rewritten] == [1, 2], str(report)
    assert all("RoPE after selection" in s.reason for s in report.rewritten), str(report)

    def oracle(q, k, v, scale, rotate, tables):
        return R.lighthouse_reference(q, k, v, levels=CFG.levels, p=CFG.pooling_factor, topk=CFG.topk,
                                      tile_budget=CFG.tile_budget, scale=scale, rotate=rotate)

    with RopeMoved(module, name, tables, rotation, {1: oracle, 2: oracle}):
        want = logits(twin, inputs)
    F.cross_entropy(want.flatten(0, 1), labels.flatten()).backward()
    # the same ops in the same order, but for the complex form's multiplication (fp32 here, complex64 there)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    for (n, p), (_, p_ref) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"grad of {n}: {m}")
    # and what the paper's order gives is further away than that
    lhcompile.apply(paper, dataclasses.replace(CFG, rope="before_pooling"), compiler="eager")
    assert (logits(paper, inputs) - got).abs().max() > 2e-5


def test_restore_gives_back_the_exact_graph_after_moving_rope():
    model = hf_model("llama")
    ids = torch.randint(0, VOCAB, (2, 64))
    graphs = []
    torch._dynamo.reset()
    torch.compile(model, backend=lambda gm, inputs: graphs.append((gm, inputs)) or gm.forward, dynamic=False)(ids)
    [(gm, inputs)] = graphs
    before, code = [(n.op, n.name, str(n.target), str(n.args)) for n in gm.graph.nodes], gm.code
    dense = gm(*inputs)[0]
    lhcompile.apply(gm, CFG)
    assert sum("RoPE after selection" in s.reason for s in lhcompile.inspect(gm)) == 2
    assert not torch.allclose(gm(*inputs)[0], dense)
    lhcompile.restore(gm)
    assert [(n.op, n.name, str(n.target), str(n.args)) for n in gm.graph.nodes] == before and gm.code == code
    assert torch.equal(gm(*inputs)[0], dense)


def test_a_model_without_rope_runs_the_papers_order_and_is_told_why():
    torch.manual_seed(0)
    model = GPT()
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 64))
    lhcompile.apply(model, CFG, compiler="eager")
    lhcompile.apply(twin, dataclasses.replace(CFG, rope="before_pooling"), compiler="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = logits(model, ids)
    assert torch.equal(out, logits(twin, ids))
    said = [str(w.message) for w in caught if issubclass(w.category, LighthouseWarning)]
    assert len(said) == 1 and "no RoPE rotation was recognised" in said[0]
    assert "harmless in a model without RoPE" in said[0]
    assert all("RoPE before pooling (the paper's order): query: going up from" in s.reason
               for s in lhcompile.inspect(model).rewritten)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels and Inductor on a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["rotate_half", "complex"])
def test_kernels_and_inductor_match_the_oracle_on_a_gpu(dtype, compiled, form):
    torch.manual_seed(3)
    cfg, n, d = LighthouseConfig(levels=3, pooling_factor=4, topk=512, rope="after_selection"), 32768, 128
    make_rotation, shrink = FORMS[form]
    cos, sin = (t.cuda() for t in _tables(n, d // shrink))
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=dtype, requires_grad=True) for h in (8, 2, 2))
    rope = Rotary.of(form, cos.to(dtype), sin.to(dtype))

    def run(a, b, c):
        return lighthouse_attention(a, b, c, cfg, rope=rope)
    out = (torch.compile(run, fullgraph=True) if compiled else run)(q, k, v)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    # the oracle in float64 on the kernels' own selection (fp32 norms summed in another order may break near-ties)
    index, _ = kernels.select(*kernels.score(q.detach(), k.detach(), cfg.levels, cfg.pooling_factor), cfg.geometry(n))
    rotate = make_rotation(cos.double(), sin.double())
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    rows = [R.take(*_pyramid(t, cfg, None if t is v64 else rotate), index) for t in (q64, k64, v64)]
    want = R.scatter(F.scaled_dot_product_attention(*rows, is_causal=True), index, None, n, cfg.levels,
                     cfg.pooling_factor)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, mine, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
        err = ((mine.double() - ref).norm() / ref.norm()).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


class _RotatedThenWritten(torch.nn.Module):
    """Hugging Face's rotate_half RoPE, then (optionally) a write into the rotated query or key before SDPA; with
    ``twice`` the table is indexed once for q and once for k (Llama 4: two nodes, one value)."""

    def __init__(self, write=None, twice=False):
        super().__init__()
        self.proj, self.write, self.twice = torch.nn.Linear(8, 3 * 2 * 8), write, twice

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q, k, v = self.proj(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)

        def rotate(t, c, s):
            return t * c + torch.cat([-t[..., 4:], t[..., :4]], dim=-1) * s

        tables = cos[:, None], sin[:, None]
        q = rotate(q, *tables)
        k = rotate(k, *((cos[:, None], sin[:, None]) if self.twice else tables))
        if self.write == "setitem":
            q[..., :4] = 0
        elif self.write == "mul_":
            q.mul_(3)
        elif self.write == "copy_ into a view":
            k[..., :1].copy_(q[..., :1])
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("write", ["setitem", "mul_", "copy_ into a view"])
def test_a_write_into_the_rotated_query_or_key_keeps_the_papers_order_and_says_why(write):
    torch.manual_seed(0)
    n, config = 64, dataclasses.replace(CFG, dense_layers=())
    cos, sin = (t.repeat(1, 1, 2) for t in _tables(n, 4))
    x = torch.randn(1, n, 8)
    model = _RotatedThenWritten(write)
    lhcompile.apply(model, config, compiler="eager")
    with pytest.warns(LighthouseWarning, match="no RoPE rotation was recognised"):
        out = model(x, cos, sin)
    [site] = lhcompile.inspect(model)
    assert site.rewritten and "written into in place" in site.reason, site.reason
    with lhcompile_off(model), models.SdpaAt({0}, lambda q, k, v, scale: lighthouse_attention(
            q, k, v, dataclasses.replace(config, rope="before_pooling"), scale=scale)):
        want = model(x, cos, sin)  # the model's own code, the write included, in the paper's order
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_query_and_key_rotated_by_two_nodes_of_one_table_are_rotated_after_selection():
    torch.manual_seed(0)
    n = 64
    cos, sin = (t.repeat(1, 1, 2) for t in _tables(n, 4))
    model = _RotatedThenWritten(twice=True)
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager")
    model(torch.randn(1, n, 8), cos, sin)
    [site] = lhcompile.inspect(model)
    assert "RoPE after selection (rotate_half, 8 of 8 dims)" in site.reason, site.reason


class lhcompile_off:
    """Run an applied module's own code eagerly for a while (its compiled call set aside)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.call, self.module._compiled_call_impl = self.module._compiled_call_impl, None

    def __exit__(self, *exc):
        self.module._compiled_call_impl = self.call


def test_packed_batches_of_changing_length_rotate_after_selection_in_the_dynamic_graph_too():
    # DataCollatorWithFlattening: every batch a new total length, so from the second one on the graph has a dynamic
    # length; the rotation is found there as in the static graph, and computes the same
    from .test_documents_pass import positions

    config = dataclasses.replace(CFG, levels=3, dense_layers=())
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2)
    batches = [(torch.randint(0, VOCAB, (1, sum(rows[0]))), positions(rows))
               for rows in ([[70, 3, 1, 40, 78]], [[50, 110]], [[33, 12, 64]])]
    want = []
    for ids, pos in batches:  # each batch on a graph of its own static length
        torch._dynamo.reset()
        fresh = copy.deepcopy(model)
        lhcompile.apply(fresh, config, compiler="eager")
        want.append(fresh(input_ids=ids, position_ids=pos).logits)
    torch._dynamo.reset()
    lhcompile.apply(model, config, compiler="eager")
    for (ids, pos), expected in zip(batches, want):
        with warnings.catch_warnings():
            warnings.simplefilter("error", LighthouseWarning)
            got = model(input_ids=ids, position_ids=pos).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    report = lhcompile.inspect(model)
    assert not isinstance(report[0].q_shape[2], int)  # the rows of the dynamic graph
    assert all("RoPE after selection (rotate_half, 16 of 16 dims)" in s.reason for s in report), str(report)
