"""The graph pass itself: every SDPA form, rewrite on GraphModules, exact restore, backend use, ONNX export."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.fx as fx

import lhcompile
from lhcompile import LighthouseConfig
from lhcompile.passes import REWRITE_TAG, find_sites

from .models import MODELS, VOCAB, hf_model, logits

CFG = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=(0, -1))
N = 64


def _structure(gm: fx.GraphModule) -> list[tuple]:
    return [(n.op, n.name, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes]


def _dynamo_graphs(model, *args):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture, dynamic=False)(*args)
    return graphs


def _exported(model, ids):
    return torch.export.export(model, (ids,), strict=False)


@pytest.mark.parametrize("capture", ["dynamo", "export"])
@pytest.mark.parametrize("name", ["llama", "titan", "gpt"])
def test_rewrite_then_restore_gives_back_the_exact_graph(capture, name):
    torch.manual_seed(0)
    model = MODELS[name]()
    ids = torch.randint(0, VOCAB, (2, N))
    if capture == "dynamo":
        [(gm, inputs)] = _dynamo_graphs(model, ids)
    else:
        gm = _exported(model, ids).module()
        inputs = (ids,)
    before_code, before = gm.code, _structure(gm)
    dense_out = gm(*inputs)
    lhcompile.apply(gm, CFG)
    assert len(lhcompile.inspect(gm).rewritten) == 2, str(lhcompile.inspect(gm))
    stages = {str(n.target) for n in gm.graph.nodes if REWRITE_TAG in n.meta}
    assert {"lhcompile.gather.default", "lhcompile.select.default", "lhcompile.scatter.default"} <= stages
    # Llama's sdpa builds its causal mask in the graph: its dense sites become is_causal=True calls as well
    rewrites = sum("original" in n.meta.get(REWRITE_TAG, {}) for n in gm.graph.nodes)
    assert rewrites == (4 if name == "llama" else 2)
    out = gm(*inputs)
    out, dense_out = (o if isinstance(o, torch.Tensor) else o[0] for o in (out, dense_out))
    assert out.shape == dense_out.shape and not torch.allclose(out, dense_out)
    lhcompile.restore(gm)
    assert _structure(gm) == before
    assert gm.code == before_code
    restored = gm(*inputs)
    assert torch.equal(restored if isinstance(restored, torch.Tensor) else restored[0], dense_out)


def test_backend_specific_aten_op_with_tuple_output_is_rewritten_and_restored():
    # below autograd, CPU SDPA is the flash-for-cpu backend op returning (out, logsumexp)
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2) * 2

    q, k, v = (torch.randn(2, 4, N, 8) for _ in range(3))
    gm = make_fx(f)(q, k, v)
    [site] = find_sites(gm.graph)
    assert str(site.node.target) == "aten._scaled_dot_product_flash_attention_for_cpu.default"
    before, dense_out = _structure(gm), gm(q, k, v)
    lhcompile.apply(gm, LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=()))
    torch.testing.assert_close(gm(q, k, v), 2 * lhcompile.lighthouse_attention(q, k, v, CFG, scale=0.2))
    lhcompile.restore(gm)
    assert _structure(gm) == before and torch.equal(gm(q, k, v), dense_out)


def test_every_sdpa_spelling_is_matched():
    def f(q, k, v, m):
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, None, 0.0, True)
        b = torch._C._nn.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True, scale=0.3)
        c = torch.ops.aten.scaled_dot_product_attention.default(q, k, v, is_causal=True)
        d = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        e = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)
        g = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return a + b + c + d + e + g

    gm = fx.symbolic_trace(f)
    sites = find_sites(gm.graph)
    assert [s.args["is_causal"] for s in sites] == [True, True, True, False, True, False]
    assert sites[1].args["scale"] == 0.3
    assert [s.problem is None for s in sites] == [True, True, True, False, False, False]
    assert "computed from the graph's inputs (m)" in sites[3].problem
    assert "dropout_p=0.1" in sites[4].problem and "is_causal=False" in sites[5].problem


def test_graph_without_shapes_needs_example_inputs():
    torch.manual_seed(0)
    model = MODELS["gpt"]()
    ids = torch.randint(0, VOCAB, (1, N))
    with pytest.raises(ValueError, match="example_inputs"):
        lhcompile.apply(fx.symbolic_trace(model), CFG)
    gm = fx.symbolic_trace(model)
    lhcompile.apply(gm, CFG, example_inputs=(ids,))
    assert len(lhcompile.inspect(gm).rewritten) == 2


def test_non_causal_masks_stay_dense_with_reason():
    class Windowed(torch.nn.Module):
        def forward(self, q):
            n = q.shape[2]
            i = torch.arange(n)
            band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 8)  # sliding window, not causal
            causal = i[None, :] <= i[:, None]
            a = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=band)
            return a + torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=causal)

    q = torch.randn(1, 2, N, 8)
    [(gm, inputs)] = _dynamo_graphs(Windowed(), q)
    lhcompile.apply(gm, LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=()))
    report = lhcompile.inspect(gm)
    assert [s.rewritten for s in report.sites] == [False, True]
    assert "not the causal mask" in report.sites[0].reason


def test_backend_rewrites_across_graph_breaks():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = MODELS["gpt"]().blocks[0], MODELS["gpt"]().blocks[1]

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    model = Broken()
    lighthouse = lhcompile.backend(LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=()), compiler="eager")
    torch._dynamo.reset()
    x = torch.randn(1, N, 64)
    out = torch.compile(model, backend=lighthouse)(x)
    assert lighthouse.report.graphs == 2 and len(lighthouse.report.rewritten) == 2
    assert out.shape == x.shape


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compiled_graph_builds_no_causal_mask_and_dense_sites_run_as_is_causal(mode, recorded):
    # transformers builds an N x N causal mask in the graph, read by all four sites: the Lighthouse sites drop it,
    # the dense ones (dense_layers, eval mode) call SDPA with is_causal=True instead, so nothing builds it, even
    # when the rewritten graph runs op by op
    graphs, keep = recorded, recorded

    n = 3 * N  # no weight or activation dimension is n
    torch.manual_seed(0)
    model = MODELS["llama"]()
    twin = copy.deepcopy(model)
    lhcompile.apply(model, CFG, compiler=keep, regional=False)  # by layer, transformers builds no mask at all
    model.train(mode == "train")
    ids = torch.randint(0, VOCAB, (1, n))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = logits(model, ids)
    assert not [w for w in caught if "erase" in str(w.message)], "the mask was erased more than once"
    report = lhcompile.inspect(model)
    assert len(report.rewritten) == (2 if mode == "train" else 0)
    assert all(s.reason.endswith("so it runs as SDPA with is_causal=True") for s in report.dense), str(report)
    shapes = [v.shape for gm in graphs for node in gm.graph.nodes
              if isinstance(v := node.meta.get("example_value"), torch.Tensor)]
    assert shapes and not [s for s in shapes if s[-2:] == (n, n)]
    calls = [node for gm in graphs for node in gm.graph.nodes
             if node.target is torch.nn.functional.scaled_dot_product_attention]
    assert len(calls) == 4  # the dense sites', and in training the Lighthouse sites' own attention on S tokens
    assert all(node.kwargs["is_causal"] and node.kwargs.get("attn_mask") is None for node in calls)
    if mode == "eval":  # the same attention as the model's own mask, on SDPA's causal path
        torch.testing.assert_close(out, logits(twin.eval(), ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_restored_model_exports_the_same_onnx_graph_and_runs_in_onnxruntime(name):
    import onnxruntime as ort
    torch.manual_seed(0)
    model = MODELS[name]()
    pristine = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (1, N))
    lhcompile.apply(model, CFG, compiler="eager")
    logits(model, ids)
    lhcompile.restore(model)

    def onnx_graph(m):
        proto = torch.onnx.export(m, (ids,), dynamo=True, verbose=False).model_proto
        return proto, [(n.op_type, list(n.input), list(n.output)) for n in proto.graph.node]

    proto, nodes = onnx_graph(model)
    assert nodes == onnx_graph(pristine)[1]
    session = ort.InferenceSession(proto.SerializeToString())
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), logits(pristine, ids).detach(), rtol=1e-4, atol=1e-4)


def test_exporting_a_rewritten_graph_says_to_restore_first():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, N))
    gm = _exported(MODELS["titan"](), ids).module()
    lhcompile.apply(gm, CFG)
    with pytest.raises(Exception, match="restore"):
        torch.export.export(gm, (ids,), strict=False)


def test_exporting_an_applied_module_exports_its_dense_graph():
    # export traces the module's own code, not its in-place compiled call: the result is the dense model
    torch.manual_seed(0)
    model = MODELS["gpt"]()
    ids = torch.randint(0, VOCAB, (1, N))
    pristine = copy.deepcopy(model)
    lhcompile.apply(model, CFG, compiler="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", lhcompile.LighthouseWarning)  # export captures no graph by design: no word
        ep = torch.export.export(model, (ids,), strict=False)
    assert "lhcompile" not in ep.graph_module.code
    assert torch.equal(ep.module()(ids), pristine(ids))


@pytest.mark.parametrize("state", ["never applied", "restored"])
def test_packed_documents_of_causal_sdpa_export_to_onnx_and_run_in_onnxruntime(state):
    # lhcompile.document_attention exports as SDPA with the documents' causal mask: standard ONNX ops
    import onnxruntime as ort

    from .test_documents_pass import positions

    torch.manual_seed(0)
    model = hf_model("llama", attention="causal_sdpa", layers=2).eval()
    ids, pos = torch.randint(0, VOCAB, (1, 192)), positions([[70, 3, 1, 40, 78]])
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=pos).logits
    if state == "restored":
        lhcompile.apply(model.train(), dataclasses.replace(CFG, levels=3), compiler="eager")
        model(input_ids=ids, position_ids=pos)
        lhcompile.restore(model).eval()
    proto = torch.onnx.export(model, (), kwargs=dict(input_ids=ids, position_ids=pos), dynamo=True,
                              verbose=False).model_proto
    assert not any("lhcompile" in n.domain or "document_attention" in n.op_type for n in proto.graph.node)
    session = ort.InferenceSession(proto.SerializeToString())
    feeds = {i.name: (ids if "input" in i.name else pos).numpy() for i in session.get_inputs()}
    got = session.run(None, feeds)[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
