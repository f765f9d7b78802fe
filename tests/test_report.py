"""The report as a user reads it: a sequence of its sites, each named by the module path the user knows, and the
rewritten graph's nodes kept pointing at the user's module."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch
import torch.fx as fx

import lhcompile
from lhcompile import LighthouseWarning
from lhcompile.passes import METADATA_TO_PORT, REWRITE_TAG, module_path

from .models import GPT, VOCAB, logits
from .steps import CFG, N, captured


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
    graphs = captured(GPT(), dataclasses.replace(CFG, dense_layers=()), torch.randint(0, VOCAB, (1, N)),
                       regional=False)  # one graph holds every site
    tagged = [n for gm in graphs for n in gm.graph.nodes if REWRITE_TAG in n.meta]
    assert {n.meta[REWRITE_TAG]["site"] for n in tagged} == {0, 1, 2, 3}
    for node in tagged:
        assert set(METADATA_TO_PORT[:2]) <= set(node.meta), node.name
        assert module_path(node) == f"blocks.{node.meta[REWRITE_TAG]['site']}"
        assert "scaled_dot_product_attention" in node.meta["stack_trace"]


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

