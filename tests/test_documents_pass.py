"""The pass on attention that keeps packed documents apart: varlen_attn, FlexAttention with torchtitan's document
masks, Hugging Face with packed position_ids (causal_sdpa, DataCollatorWithFlattening); restore node for node;
what stays dense says why."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention
from torch.nn.attention.varlen import varlen_attn

import lhcompile
import lhcompile.operator.reference
from lhcompile import Documents, LighthouseConfig, LighthouseWarning, lighthouse_attention

from .models import VOCAB, hf_model

CFG = LighthouseConfig(levels=3, pooling_factor=2, topk=8, tile_budget=4, dense_layers=())  # long: >= 32 tokens
N = 192
LENGTHS = [[70, 3, 1, 40, 78], [33, 60, 99]]


def positions(rows=LENGTHS) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])


def structure(gm: torch.fx.GraphModule) -> list[tuple]:
    return [(n.op, n.name, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes]


def captured(fn, *args) -> torch.fx.GraphModule:
    """fn's graph as Dynamo captures it, never run (varlen_attn has no CPU kernel)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        raise RuntimeError("captured")

    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="captured"):
        torch.compile(fn, backend=keep, fullgraph=True)(*args)
    [gm] = graphs
    return gm


def qkv(b, n=N, grad=False):
    return tuple(torch.randn(b, heads, n, 8, requires_grad=grad) for heads in (4, 2, 2))


_VARLEN_GQA = "enable_gqa" in inspect.signature(varlen_attn).parameters


class Varlen(torch.nn.Module):
    """torchtitan's VarlenAttention: (B, N) rows laid end to end, documents by cumulative lengths, and a bound on
    their length (``longest``, as torchtitan's VarlenMetadata and Hugging Face's max_length_q hand it; else N)."""

    def forward(self, q, k, v, cu, longest=None):
        b, h, n, d = q.shape
        if not _VARLEN_GQA:  # torch 2.11's varlen_attn takes as many key/value heads as query heads
            k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
        rows = [t.transpose(1, 2).reshape(b * n, -1, d) for t in (q, k, v)]
        longest = n if longest is None else longest
        out = varlen_attn(*rows, cu, cu, longest, longest, window_size=(-1, 0),
                          **({"enable_gqa": True} if _VARLEN_GQA else {}))
        return out.view(b, n, h, d).transpose(1, 2)


def _cu(rows=LENGTHS) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor([n for r in rows for n in r]).cumsum(0).tolist()], dtype=torch.int32)


def test_varlen_attn_is_rewritten_per_document_and_restored_node_for_node():
    q, k, v = qkv(2, grad=True)
    model = Varlen()
    lhcompile.apply(model, CFG, compiler="eager")
    out = model(q, k, v, _cu())
    want = lighthouse_attention(q, k, v, CFG, documents=Documents.from_positions(positions()))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = torch.randn_like(out)
    for mine, ref in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    [site] = lhcompile.inspect(model)
    assert site.rewritten and site.documents and site.op == "varlen_attn"
    assert site.reason == "lighthouse per document (cu_seq_q of varlen_attn)"

    gm = captured(Varlen(), *qkv(2), _cu())
    before, code = structure(gm), gm.code
    lhcompile.apply(gm, CFG)
    assert len(lhcompile.inspect(gm).rewritten) == 1 and structure(gm) != before
    lhcompile.restore(gm)
    assert structure(gm) == before and gm.code == code


def _titan_masks(pos: torch.Tensor) -> dict:
    from torchtitan.models.common.attention import (get_causal_mask_mod, get_document_mask_mod,
                                                    get_efficient_causal_mask_mod_for_packed_document)

    return {
        "document ids": and_masks(get_causal_mask_mod(), get_document_mask_mod(pos)),
        "document starts": and_masks(get_causal_mask_mod(), get_efficient_causal_mask_mod_for_packed_document(pos)),
    }


class Flex(torch.nn.Module):
    def forward(self, q, k, v, block_mask):
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mask", ["document ids", "document starts"])
def test_torchtitans_document_masks_are_rewritten_per_document_and_restored_node_for_node(mask, batch):
    pytest.importorskip("torchtitan")
    pos = positions(LENGTHS[:batch])
    block_mask = create_block_mask(_titan_masks(pos)[mask], batch, None, N, N, device="cpu")
    q, k, v = qkv(batch)
    model = Flex()
    lhcompile.apply(model, CFG, compiler="eager")
    out = model(q, k, v, block_mask)  # FlexAttention has no CPU backward: the operator's tests cover gradients
    torch.testing.assert_close(out, lighthouse_attention(q, k, v, CFG, documents=Documents.from_positions(pos)),
                               rtol=0, atol=0)
    [site] = lhcompile.inspect(model)
    assert site.rewritten and site.documents and "of the FlexAttention mask" in site.reason

    gm = captured(Flex(), q, k, v, block_mask)
    before, code = structure(gm), gm.code
    lhcompile.apply(gm, CFG)
    lhcompile.restore(gm)
    assert structure(gm) == before and gm.code == code


def test_flex_attention_that_is_no_causal_document_mask_stays_dense_and_says_why():
    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 16)

    def bias(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx)

    q, k, v = qkv(1)
    causal = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 1, None, N, N, device="cpu")
    cases = {
        "window": (dict(block_mask=create_block_mask(window, 1, None, N, N, device="cpu")),
                   "is not plain causal or document-causal"),
        "score_mod": (dict(block_mask=causal, score_mod=bias), "FlexAttention with a score_mod"),
        "no mask": ({}, "not causal (no q_idx >= kv_idx)"),
    }
    for name, (kwargs, why) in cases.items():
        gm = captured(lambda q, k, v: flex_attention(q, k, v, enable_gqa=True, **kwargs), q, k, v)
        lhcompile.apply(gm, CFG)
        [site] = lhcompile.inspect(gm)
        assert not site.rewritten and why in site.reason, (name, site.reason)
    gm = captured(lambda q, k, v: flex_attention(q, k, v, block_mask=causal, enable_gqa=True), q, k, v)
    lhcompile.apply(gm, CFG)
    [site] = lhcompile.inspect(gm)
    assert site.rewritten and not site.documents and site.reason == "lighthouse"


@pytest.mark.parametrize("config", [CFG, dataclasses.replace(CFG, scorer="dilated", dilation=4, rope="after_selection")],
                         ids=["norm", "dilated, RoPE after selection"])
@pytest.mark.parametrize("given", ["position_ids", "cu_seq_lens"])
def test_hf_llama_with_packed_documents_gives_each_document_what_it_gets_alone(given, config):
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2)
    lhcompile.apply(model, config, compiler="eager")
    rows = [[70, 3, 1, 40, 78]]
    ids = torch.randint(0, VOCAB, (1, N))
    cu = torch.tensor([0, *rows[0]]).cumsum(0).int()
    packed = model(input_ids=ids, **(dict(position_ids=positions(rows)) if given == "position_ids" else dict(
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(rows[0]), max_length_k=max(rows[0])))).logits
    report = lhcompile.inspect(model)
    assert len(report.rewritten) == 2 and all(site.documents for site in report.rewritten), str(report)
    start = 0
    for n in rows[0]:
        alone = model(input_ids=ids[:, start : start + n], position_ids=torch.arange(n)[None]).logits
        torch.testing.assert_close(packed[:, start : start + n], alone, rtol=1e-5, atol=1e-5)
        start += n


@pytest.fixture
def selections(monkeypatch) -> list:
    """One entry per call of Lighthouse per document's selection (on the CPU)."""
    calls = []
    select = lhcompile.operator.reference.select_documents
    monkeypatch.setattr(lhcompile.operator.reference, "select_documents", lambda *a: calls.append(1) or select(*a))
    return calls


@pytest.mark.parametrize("checkpointed", [False, True], ids=["layers", "checkpointed layers"])
def test_a_batch_of_short_documents_runs_the_graph_as_captured(checkpointed, selections):
    # Lighthouse per document on documents shorter than min_lighthouse_len (32 here) is dense attention within each:
    # what the model computed before the pass, without the stages sized for the most long documents a batch holds
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2)
    dense = hf_model("llama", attention="causal_sdpa", layers=2)
    dense.load_state_dict(model.state_dict())
    for m in (model, dense):
        if checkpointed:
            m.gradient_checkpointing_enable()
    lhcompile.apply(model, CFG, compiler="eager")
    ids = torch.randint(0, VOCAB, (1, N))
    short = positions([[20, 3, 1, 30, 31, 19, 25, 30, 25, 8]])
    out, want = (m(input_ids=ids, position_ids=short).logits for m in (model, dense))
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    for mine, ref in zip(torch.autograd.grad(out, list(model.parameters()), g),
                         torch.autograd.grad(want, list(dense.parameters()), g)):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    report = lhcompile.inspect(model)
    assert not selections and report.dense_batches == 2 and "2 graph call(s) found no document" in str(report)

    model(input_ids=ids, position_ids=positions([[70, 3, 1, 40, 78]])).logits.sum().backward()
    assert selections and lhcompile.inspect(model).dense_batches == 2  # a long document: Lighthouse per document


def test_a_batch_of_one_document_per_row_runs_plain_lighthouse(selections, monkeypatch):
    # Lighthouse per document on a document per row is plain Lighthouse on each row: its own graph, without the
    # relayout and the stages sized for the most long documents a batch could hold. Compiled whole, the model's
    # position ids reach the graph as an input, so only the probe can tell
    from lhcompile.capture import probe

    plain = []
    select = lhcompile.operator.reference.select
    monkeypatch.setattr(lhcompile.operator.reference, "select", lambda *a: plain.append(1) or select(*a))
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2)
    lhcompile.apply(model, CFG, compiler="eager", regional=False)
    ids = torch.randint(0, VOCAB, (2, N))
    rows = positions([[N], [N]])
    out = model(input_ids=ids, position_ids=rows).logits
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(model.parameters()), g)
    report = lhcompile.inspect(model)
    assert plain and not selections and report.variant_calls == {"rows": 1}, str(report)
    assert "1 graph call(s) found one document per row in their batch and ran the graph rewritten for plain " \
           "Lighthouse on each row" in str(report)
    # the same batch through the rewritten graph: Lighthouse per document
    monkeypatch.setattr(probe.DocumentProbe, "variant", lambda self, args: probe.DOCUMENTS)
    want = model(input_ids=ids, position_ids=rows).logits
    assert selections
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for mine, ref in zip(grads, torch.autograd.grad(want, list(model.parameters()), g)):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


def test_a_graph_for_some_batches_compiles_with_inductor_at_the_first_batch_that_needs_it(selections):
    # a graph of static shapes compiles its graph as captured (and the others) at the first batch that needs it,
    # with that batch for example, outside the capture's tracing: inside a checkpointed layer, in Inductor
    from torch._inductor.compile_fx import compile_fx

    def compiler(gm, example_inputs):
        nodes = [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]
        compiled.append("rewritten" if any("select_documents" in str(n.target) for n in nodes) else "other")
        return compile_fx(gm, example_inputs)

    compiled = []
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2)
    dense = hf_model("llama", attention="causal_sdpa", layers=2)
    dense.load_state_dict(model.state_dict())
    for m in (model, dense):
        m.gradient_checkpointing_enable()
    lhcompile.apply(model, CFG, compiler=compiler)
    ids = torch.randint(0, VOCAB, (1, N))
    model(input_ids=ids, position_ids=positions([[70, 3, 1, 40, 78]])).logits.sum().backward()
    assert compiled == ["rewritten"] and selections
    for short in ([[20, 3, 1, 30, 31, 19, 25, 30, 25, 8]], [[31] * 6 + [6]]):
        out, want = (m(input_ids=ids, position_ids=positions(short)).logits for m in (model, dense))
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        g = torch.randn_like(out)
        for mine, ref in zip(torch.autograd.grad(out, list(model.parameters()), g),
                             torch.autograd.grad(want, list(dense.parameters()), g)):
            torch.testing.assert_close(mine, ref, rtol=1e-3, atol=1e-4)
        assert compiled == ["rewritten", "other"], "compiled once, at the first batch without a long document"
    # 2 batches x 2 layers: checkpointing recomputes inside the compiled graph
    assert lhcompile.inspect(model).variant_calls == {"as captured": 4}


def test_a_graph_as_captured_that_does_not_compile_leaves_every_batch_to_lighthouse_per_document(selections):

    def compiler(gm, example_inputs):  # compiles what the pass rewrote, fails on the graph as captured
        if not any("select_documents" in str(n.target) for n in gm.graph.nodes):
            raise RuntimeError("no kernel for this op here")
        return gm.forward

    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2)
    lhcompile.apply(model, CFG, compiler=compiler)
    with pytest.warns(LighthouseWarning, match=r"as captured.*did not compile \(RuntimeError: no kernel for this op"):
        model(input_ids=torch.randint(0, VOCAB, (1, N)),
              position_ids=positions([[20, 3, 1, 30, 31, 19, 25, 30, 25, 8]]))
    assert selections and lhcompile.inspect(model).dense_batches == 0


@pytest.mark.parametrize("mix", [[[70, 3, 1, 40, 78], [33, 60, 99]], [[20, 172], [192]], [[5] * 38 + [2]] * 2])
def test_the_documents_are_found_from_every_form_of_documents(mix):
    from lhcompile.operator.documents import document_lengths, longest_document

    longest = max(n for row in mix for n in row)
    pos = positions(mix)
    starts = pos == 0
    ids = starts.long().cumsum(1)
    ends = torch.stack([torch.cat([torch.full((n,), start + n - 1) for start, n in zip(
        torch.tensor([0, *row[:-1]]).cumsum(0).tolist(), row)]) for row in mix])
    first = torch.tensor([0, *mix[0][:-1]]).cumsum(0)
    cases = [("starts", [starts], longest), ("ids", [ids], longest), ("cu_seqlens", [_cu(mix)], longest),
             ("last_token", [ends], longest),
             # a FlexAttention mask's tables by token alone: one row, the same for every row of the batch
             ("ids", [ids[0]], max(mix[0])), ("first_token", [first, ids[0] - 1], max(mix[0]))]
    for form, tensors, want in cases:
        assert longest_document(form, tensors) == want, form
    lengths = [n for row in mix for n in row]
    for form, tensors, _ in cases[:4]:  # the lengths a probe reads, row after row (the rows are known there)
        assert document_lengths(form, tensors, len(mix), N) == lengths, form


def test_layers_compiled_on_their_own_run_plain_lighthouse_until_a_batch_is_packed():
    # the model's own call runs eagerly around its layers (regional): transformers looks at position_ids there, so
    # a batch of one document per row needs no per-document machinery, and a packed one gets it
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2)
    lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=()), compiler="eager", regional=True)
    ids = torch.randint(0, VOCAB, (1, N))
    model(input_ids=ids)
    plain = lhcompile.inspect(model)
    assert len(plain.rewritten) == 2 and not any(site.documents for site in plain), str(plain)
    rows = [[70, 3, 1, 40, 78]]
    packed = model(input_ids=ids, position_ids=positions(rows)).logits
    report = lhcompile.inspect(model)
    assert sum(bool(site.rewritten and site.documents) for site in report) == 2, str(report)
    start = 0
    for n in rows[0]:
        alone = model(input_ids=ids[:, start : start + n]).logits
        torch.testing.assert_close(packed[:, start : start + n], alone, rtol=1e-5, atol=1e-5)
        start += n


def test_packed_batches_of_changing_length_compile_twice_and_stay_lighthouse(recorded):
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2)
    graphs = recorded
    lhcompile.apply(model, CFG, compiler=recorded)
    for rows in ([[70, 3, 1, 40, 78]], [[50, 110]], [[33, 12, 64]], [[9, 100, 7, 90]]):
        n = sum(rows[0])
        out = model(input_ids=torch.randint(0, VOCAB, (1, n)), position_ids=positions(rows)).logits
        assert out.shape == (1, n, VOCAB)
    report = lhcompile.inspect(model)
    assert report.graphs == 2, "the first length, then one graph with a dynamic length for all others"
    # each compiled rewritten; the one of a dynamic length also as captured (for batches without a long document),
    # which a graph of a static length compiles only once a batch needs it (none here)
    selections = [{str(n.target) for n in gm.graph.nodes} & {"lhcompile.select_documents.default",
                                                             "lhcompile.select.default"} for gm in graphs]
    assert selections == [{"lhcompile.select_documents.default"}, {"lhcompile.select_documents.default"}, set()]
    assert all(s.rewritten and s.documents for s in report), str(report)


@pytest.mark.parametrize("collator", [{}, {"return_flash_attn_kwargs": True, "return_position_ids": False}],
                         ids=["position_ids", "cu_seq_lens"])
def test_data_collator_with_flattening_trains_lighthouse_per_document_through_the_trainer(tmp_path, collator):
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    from lhcompile.integrations.hf import LighthouseCallback

    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2)
    lengths = torch.randint(8, 90, (24,)).tolist()
    data = [{"input_ids": torch.randint(0, VOCAB, (n,)).tolist()} for n in lengths]
    callback = LighthouseCallback(dataclasses.replace(CFG, dense_layers=(0,)), recovery_start=0.75)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=8, report_to=[],
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                      data_collator=DataCollatorWithFlattening(**collator))
    trainer.train()
    assert callback.switched_at == 6
    report = callback.report
    rewritten = [s for s in report if s.rewritten]
    assert rewritten and all(s.documents for s in rewritten), str(report)
    # per kind of layer (dense layer 0, Lighthouse): the first length, then one dynamic graph for all later ones
    assert report.graphs <= 2 * 2, f"{report.graphs} graphs for 6 batches of different lengths"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))


@pytest.fixture
def reads(monkeypatch) -> list:
    """One entry per batch whose documents a probe read on the host."""
    from lhcompile.capture import probe

    calls = []
    for name in ("document_lengths", "longest_document"):
        read = getattr(probe, name)
        monkeypatch.setattr(probe, name, lambda *a, read=read: calls.append(1) or read(*a))
    return calls


@pytest.mark.parametrize("regional", [True, False], ids=["by layer", "whole"])
def test_a_models_layers_read_each_batchs_documents_once(regional, reads):
    # every layer is handed the batch's own document tensors: the first one's reading serves the others until the
    # batch changes (other tensors, or the same ones written into)
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=3)
    lhcompile.apply(model, CFG, compiler="eager", regional=regional)
    ids = torch.randint(0, VOCAB, (1, N))
    packed, short = positions([[70, 3, 1, 40, 78]]), positions([[20, 3, 1, 30, 31, 19, 25, 30, 25, 8]])
    model(input_ids=ids, position_ids=packed)
    assert len(reads) == 1
    model(input_ids=ids, position_ids=short)
    assert len(reads) == 2 and lhcompile.inspect(model).dense_batches == (3 if regional else 1)
    short.copy_(packed)  # the same tensor, now packed with a long document: read again, and Lighthouse again
    out = model(input_ids=ids, position_ids=short).logits
    assert len(reads) == 3 and lhcompile.inspect(model).dense_batches == (3 if regional else 1)
    torch.testing.assert_close(out, model(input_ids=ids, position_ids=positions([[70, 3, 1, 40, 78]])).logits)


def test_varlens_max_q_below_min_lighthouse_len_runs_the_graph_as_captured_without_reading_the_documents(
        reads, monkeypatch):
    from lhcompile.passes.kinds import varlen

    monkeypatch.setattr(varlen.Varlen, "trains_on", None)  # varlen_attn has no CPU kernel: stand in for it

    def compiler(gm, example_inputs):
        if any("varlen" in str(n.target) for n in gm.graph.nodes):  # the graph as captured
            return lambda *args: ran.append("as captured") or [torch.zeros(1, N, 4, 8)]
        return lambda *args: ran.append("rewritten") or gm.forward(*args)

    ran = []
    model = Varlen()
    lhcompile.apply(model, CFG, compiler=compiler)
    q, k, v = qkv(1)
    short = [20, 3, 1, 30, 31, 19, 25, 30, 25, 8]
    for longest in (31, 30, 20):  # a constant at the first call, then an input of a graph with dynamic shapes
        model(q, k, v, _cu([short]), longest)
    assert ran == ["as captured"] * 3 and not reads
    # a bound that is only a bound (max_q = N) makes the probe read the documents, which are still short
    model(q, k, v, _cu([short]), N)
    assert ran[-1] == "as captured" and len(reads) == 1
    out = model(q, k, v, _cu([[70, 3, 1, 40, 78]]), 78)
    assert ran[-1] == "rewritten" and len(reads) == 2
    torch.testing.assert_close(out, lighthouse_attention(q, k, v, CFG, documents=Documents.from_positions(
        positions([[70, 3, 1, 40, 78]]))), rtol=0, atol=0)


@pytest.fixture
def dense_on_cpu(monkeypatch) -> None:
    """The CPU stands in for the GPU where the pass asks whether document_attention runs its kernels (the dtype rule
    kept), and for varlen_attn's training device; batches of this file's 192 tokens count as large enough."""
    from lhcompile.capture import probe
    from lhcompile.passes.kinds import varlen

    monkeypatch.setattr(varlen.Varlen, "trains_on", None)
    monkeypatch.setattr(probe, "runs_kernels",
                        lambda device, dtype: lhcompile.operator.documents.runs_kernels(torch.device("cuda"), dtype))
    monkeypatch.setattr(lhcompile.operator.documents.PLANNER, "cudnn_min_batch", 64)


def _graph_name(gm: torch.fx.GraphModule) -> str:
    """Which of the backend's graphs of a Varlen model gm is."""
    targets = " ".join(str(n.target) for n in gm.graph.nodes)
    return ("as captured" if "varlen" in targets else "rewritten" if "select_documents" in targets else
            "dense" if "document_attention" in targets else "?")


def _recording_compiler(ran: list, failing: str | None = None):
    """A compiler that appends to ``ran`` the name of each of a Varlen model's graphs as it runs, stands in for
    varlen_attn as captured (no CPU kernel) with zeros, and fails to compile the graph named ``failing``."""

    def compiler(gm, example_inputs):
        name = _graph_name(gm)
        if name == failing:
            raise RuntimeError("no kernel for this op here")
        if name == "as captured":
            return lambda *args: ran.append(name) or [torch.zeros(1, N, 4, 8, dtype=torch.bfloat16)]
        return lambda *args: ran.append(name) or gm.forward(*args)

    return compiler


def test_short_documents_of_one_length_run_document_attention_where_it_is_the_faster_kernel(reads, dense_on_cpu):
    # on a GPU, document_attention runs documents of one width together on cuDNN, faster than the model's own
    # kernel there (BENCHMARKS.md), while documents of many lengths would mostly run on its flash varlen: the probe
    # chooses by the batch's lengths. Here a stub stands in for varlen_attn as captured

    ran = []
    compiler = _recording_compiler(ran)
    model = Varlen()
    lhcompile.apply(model, CFG, compiler=compiler)
    q, k, v = (t.bfloat16().requires_grad_() for t in qkv(1))
    equal, mixed = [[16] * 12], [[17, 18, 19, 20, 21, 22, 23, 24, 28]]
    out = model(q, k, v, _cu(equal), 16)
    assert ran == ["dense"] and len(reads) == 1  # a short max_q no longer spares the read: the lengths choose
    g = torch.randn_like(out)
    want = lighthouse_attention(q, k, v, CFG, documents=Documents.from_positions(positions(equal)))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for mine, ref in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    model(q, k, v, _cu(mixed), 28)
    assert ran[-1] == "as captured" and len(reads) == 2
    model(q, k, v, _cu([[70, 3, 1, 40, 78]]), 78)
    assert ran[-1] == "rewritten" and len(reads) == 3
    report = lhcompile.inspect(model)
    assert report.variant_calls == {"dense": 1, "as captured": 1} and report.dense_batches == 2
    assert "1 graph call(s) found no document long enough for Lighthouse, and documents of few widths in their " \
           "batch and ran the graph rewritten for dense attention within documents" in str(report)
    # in full precision document_attention is a reference on every device: the model's own kernel stays
    lhcompile.restore(model)
    lhcompile.apply(model, CFG, compiler=compiler)
    model(*(t.float() for t in (q, k, v)), _cu(equal), 16)
    assert ran[-1] == "as captured" and len(reads) == 3


def test_a_dense_graph_that_does_not_compile_leaves_its_batches_to_the_graph_as_captured(dense_on_cpu):
    ran = []
    model = Varlen()
    lhcompile.apply(model, CFG, compiler=_recording_compiler(ran, failing="dense"))
    q, k, v = (t.bfloat16() for t in qkv(1))
    with pytest.warns(LighthouseWarning, match=r"dense attention within documents .*did not compile \(RuntimeError: "
                      r"no kernel for this op here\); those batches run the graph as captured \(dense within "
                      r"documents\) where that compiled, else Lighthouse per document"):
        model(q, k, v, _cu([[16] * 12]), 16)
    assert ran == ["as captured"] and lhcompile.inspect(model).variant_calls == {"as captured": 1}


def _written_in_place(buffer: torch.Tensor, batch: torch.Tensor, how: str) -> None:
    """Write ``batch`` into ``buffer`` the ways that move no version counter."""
    if how == "numpy":
        buffer.numpy()[:] = batch.numpy()
    else:
        buffer.untyped_storage().copy_(batch.untyped_storage())


@pytest.mark.parametrize("how", ["numpy", "untyped_storage"])
@pytest.mark.parametrize("regional", [True, False], ids=["by layer", "whole"])
def test_a_batch_written_into_the_last_ones_tensors_is_read_anew(how, regional):
    # a reused position buffer, written without moving its version counter: one document per row, then packed. The
    # packed batch's documents must not attend across their boundaries, whatever the last batch was
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2)
    reference = copy.deepcopy(model)
    for m in (model, reference):
        lhcompile.apply(m, CFG, compiler="eager", regional=regional)
    ids = torch.randint(0, VOCAB, (1, N))
    buffer = positions([[N]])
    model(input_ids=ids, position_ids=buffer)  # the "rows" graph: one document per row
    packed = positions([[70, 3, 1, 40, 78]])
    _written_in_place(buffer, packed, how)
    assert torch.equal(buffer, packed) and buffer._version == 0
    got = model(input_ids=ids, position_ids=buffer).logits
    torch.testing.assert_close(got, reference(input_ids=ids, position_ids=packed.clone()).logits, rtol=0, atol=0)


def _broadcast_into_a_reused_buffer(rank):
    # rank 0 reads each batch, every rank receives it into the buffer it reuses: rank 1's buffer never changes its
    # version counter, and rank 1 must compute what rank 0 does
    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2)
    lhcompile.apply(model, CFG, compiler="eager")
    ids = torch.randint(0, VOCAB, (1, N))
    buffer = positions([[N]]) if rank == 0 else torch.zeros(1, N, dtype=torch.long)
    for batch in (positions([[N]]), positions([[70, 3, 1, 40, 78]])):
        if rank == 0:
            buffer = batch.clone()  # rank 0 loads a new tensor
        dist.broadcast(buffer, src=0)
        out = model(input_ids=ids, position_ids=buffer).logits.contiguous()
        gathered = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(gathered, out)
        torch.testing.assert_close(gathered[1], gathered[0], rtol=0, atol=0)


def test_a_batch_broadcast_into_a_reused_buffer_is_read_anew(tmp_path):
    from .distributed import spawn

    spawn(_broadcast_into_a_reused_buffer, tmp_path)


def test_a_hand_built_block_sparsity_that_leaves_out_allowed_blocks_keeps_flexattention():
    # BlockMask.from_kv_blocks with a causal mask_mod: the block tables are the caller's, checked at each call. All
    # of the causal blocks listed: the mask is the causal one, Lighthouse; a local window of blocks: FlexAttention
    from torch.nn.attention.flex_attention import BlockMask

    n, causal = 512, (lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    q, k, v = qkv(1, n=n)
    rows = n // 128
    every = BlockMask.from_kv_blocks(torch.arange(1, rows + 1, dtype=torch.int32).view(1, 1, rows),
                                     torch.arange(rows, dtype=torch.int32).expand(rows, rows).reshape(1, 1, rows, rows)
                                     .contiguous(), mask_mod=causal)
    window = torch.stack([torch.tensor([i, max(i - 1, 0), 0, 0]) for i in range(rows)]).int().view(1, 1, rows, rows)
    local = BlockMask.from_kv_blocks(torch.tensor([[[1, 2, 2, 2]]], dtype=torch.int32), window, mask_mod=causal)
    model = Flex()
    config = dataclasses.replace(CFG, levels=2, topk=16, tile_budget=8)
    lhcompile.apply(model, config, compiler="eager")
    torch.testing.assert_close(model(q, k, v, every), lighthouse_attention(q, k, v, config), rtol=0, atol=0)
    [site] = lhcompile.inspect(model)
    assert site.rewritten, str(lhcompile.inspect(model))
    got = model(q, k, v, local)
    torch.testing.assert_close(got, flex_attention(q, k, v, block_mask=local, enable_gqa=True), rtol=1e-5, atol=1e-5)
    [site] = lhcompile.inspect(model)
    assert not site.rewritten and "leaves out blocks its mask_mod allows" in site.reason, site.reason
