"""What users do to an applied model after ``apply``: copy it, pickle it, compile it again, feed it many lengths.
Each either keeps Lighthouse or says plainly that it does not."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import lhcompile
from lhcompile import LighthouseWarning

from .models import GPT, VOCAB, TitanLlama3, hf_model, logits
from .steps import CFG, N, assert_same_training_step, lighthouse_at


def _applied():
    torch.manual_seed(0)
    model = GPT()
    twin = copy.deepcopy(model)
    lhcompile.apply(model, CFG, compiler="eager")
    return model, twin


def test_a_deep_copy_runs_lighthouse_like_the_original_with_a_report_of_its_own():
    model, twin = _applied()
    ids = torch.randint(0, VOCAB, (2, N))
    logits(model, ids)
    ema = copy.deepcopy(model)  # taken after the original ran: its compiled graphs are the original's
    assert "seen yet" in str(lhcompile.inspect(ema))
    assert_same_training_step(ema, twin, ids, {1, 2})
    assert [s.rewritten for s in lhcompile.inspect(ema)] == [False, True, True, False]
    assert len(lhcompile.inspect(model)) == 4  # the original's report is its own
    assert next(ema.parameters()).data_ptr() != next(model.parameters()).data_ptr()
    ema.eval()
    with torch.no_grad():  # and the copy follows its own train/eval flag
        torch.testing.assert_close(logits(ema, ids), logits(twin.eval(), ids), rtol=1e-6, atol=1e-6)
    lhcompile.restore(ema)  # the copy restores on its own
    assert lhcompile.inspect(model) and ema._compiled_call_impl is None


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickled_copy_is_plainly_not_applied_and_the_pickling_says_so(how):
    model, twin = _applied()
    model = copy.deepcopy(model)
    with pytest.warns(LighthouseWarning, match="the loaded copy is not applied"):
        if how == "pickle":
            loaded = pickle.loads(pickle.dumps(model))
        else:
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
    assert not lhcompile.inspect(loaded) and "not applied to this model" in str(lhcompile.inspect(loaded))
    ids = torch.randint(0, VOCAB, (2, N))
    torch.testing.assert_close(logits(loaded, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)  # dense, uncompiled
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)  # not "already rewritten"
        lhcompile.apply(loaded, CFG, compiler="eager")
    assert_same_training_step(loaded, twin, ids, {1, 2})


def test_a_shallow_copy_is_plainly_not_applied():
    model, twin = _applied()
    ids = torch.randint(0, VOCAB, (2, N))
    logits(model, ids)
    shallow = copy.copy(model)
    assert not lhcompile.inspect(shallow) and lhcompile.inspect(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        lhcompile.apply(shallow, CFG, compiler="eager")
    lhcompile.restore(shallow)
    assert len(lhcompile.inspect(model).rewritten) == 2


def test_module_compile_after_apply_keeps_lighthouse_and_restore_gives_it_back():
    model, twin = _applied()
    ids = torch.randint(0, VOCAB, (2, N))
    with pytest.warns(LighthouseWarning, match=r"GPT.compile\(\) after lhcompile.apply"):
        model.compile(backend="eager")
    assert_same_training_step(model, twin, ids, {1, 2})
    assert len(lhcompile.inspect(model).rewritten) == 2
    lhcompile.restore(model)
    assert model._compiled_call_impl is not None  # the user's own compile, which now runs the dense model
    torch.testing.assert_close(logits(model, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)
    model.compile(backend="eager")  # plain Module.compile again, no word
    assert "compile" not in model.__dict__


def test_more_lengths_than_dynamos_recompile_limit_are_said_to_run_dense():
    model, _ = _applied()
    lengths = [N + 16 * i for i in range(5)]
    with torch._dynamo.config.patch(recompile_limit=3), \
            pytest.warns(LighthouseWarning, match="has reached its recompile limit") as record:
        for n in lengths:
            logits(model, torch.randint(0, VOCAB, (1, n)))
        for n in lengths:  # lengths seen before: not said again
            logits(model, torch.randint(0, VOCAB, (1, n)))
    [warning] = [w for w in record if "recompile limit" in str(w.message)]
    assert f"(1, {lengths[3]}, " in str(warning.message)  # the layers' input
    assert lhcompile.inspect(model).graphs == 3  # one kind of layer: the limit holds for it


def test_a_call_past_the_recompile_limit_through_another_guard_is_said_to_run_dense():
    model, _ = _applied()
    ids = torch.randint(0, VOCAB, (1, N))
    with torch._dynamo.config.patch(recompile_limit=1), \
            pytest.warns(LighthouseWarning, match="shapes it had seen, but something else Dynamo guards on changed"):
        logits(model, ids)
        with torch.no_grad():  # a training-mode forward without gradients (a teacher pass): grad mode is guarded
            logits(model, ids)
    assert "none of the graphs lhcompile compiled ran" in str(lhcompile.inspect(model))


def test_lengths_within_the_limit_say_nothing():
    model, _ = _applied()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        for n in (N, N + 16, N):
            logits(model, torch.randint(0, VOCAB, (1, n)))
        model.eval()
        with torch.no_grad():
            logits(model, torch.randint(0, VOCAB, (1, N)))


@pytest.mark.parametrize("around", ["model.forward", "a submodule"])
def test_running_the_model_around_its_compiled_call_is_said_to_run_dense(around):
    model = hf_model("llama")
    lhcompile.apply(model, CFG, compiler="eager", regional=False)
    ids = torch.randint(0, VOCAB, (1, N))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        model(input_ids=ids)  # through the compiled call: nothing to say
    with pytest.warns(LighthouseWarning, match="ran outside the compiled call"):
        if around == "model.forward":
            model.forward(input_ids=ids)
        else:
            model.lm_head(model.model(input_ids=ids).last_hidden_state)
    assert "ran outside the compiled call" in str(lhcompile.inspect(model))
    lhcompile.restore(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        model.forward(input_ids=ids)  # dense by choice now: nothing to say


@pytest.mark.parametrize("around", ["model.forward", "a submodule"])
def test_layers_compiled_on_their_own_run_lighthouse_however_the_model_is_called(around):
    torch.manual_seed(0)
    model = hf_model("llama")
    twin = copy.deepcopy(model)
    lhcompile.apply(model, CFG, compiler="eager")
    ids = torch.randint(0, VOCAB, (1, N))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)
        got = (model.forward(input_ids=ids).logits if around == "model.forward" else
               model.lm_head(model.model(input_ids=ids).last_hidden_state))
    with lighthouse_at({1, 2}):
        want = twin(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_blocks_compiled_in_place_are_taken_over_per_kind_and_given_back_on_restore():
    # torchtitan's apply_compile: block.compile() on every layer before anything else
    torch.manual_seed(0)
    model = TitanLlama3()
    twin = copy.deepcopy(model)
    for block in model.layers.values():
        block.compile(backend="eager")
    before = {block: block._compiled_call_impl for block in model.layers.values()}
    ids = torch.randint(0, VOCAB, (2, N))
    lhcompile.apply(model, CFG, compiler="eager")
    assert_same_training_step(model, twin, ids, {1, 2})
    # each kind of block is compiled once, the model's own code runs as written around them
    report = lhcompile.inspect(model)
    fates = {s.module_path: s.reason for s in report if s.training}
    assert fates == {
        "layers.0.attention": "dense layer (site 0 of 4 is in dense_layers=(0, -1))",
        "layers.1.attention": "lighthouse",
        "layers.2.attention": "lighthouse",
        "layers.3.attention": "dense layer (site 3 of 4 is in dense_layers=(0, -1))",
    }
    assert (report.graphs, report.compiled) == (1, 2)  # one graph serves the blocks, dense and Lighthouse
    lhcompile.restore(model)
    assert {block: block._compiled_call_impl for block in model.layers.values()} == before
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("called_first", [False, True], ids=["fresh", "already-called"])
def test_apply_to_a_torch_compiled_model_rewrites_the_module_it_wraps(called_first):
    torch.manual_seed(0)
    model = GPT()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(0, VOCAB, (2, N))
    if called_first:
        logits(compiled, ids)
    assert lhcompile.apply(compiled, CFG, compiler="eager") is compiled
    with lighthouse_at({1, 2}):
        want = logits(twin, ids)
    torch.testing.assert_close(logits(compiled, ids), want, rtol=1e-6, atol=1e-6)
    assert len(lhcompile.inspect(compiled).rewritten) == 2
    lhcompile.restore(compiled)
    torch.testing.assert_close(logits(compiled, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("first", ["train", "eval"])
def test_the_module_mode_decides_every_call_even_when_forward_never_reads_it(first):
    torch.manual_seed(0)
    model = TitanLlama3()  # its forward never reads self.training, so Dynamo does not guard on it
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, N))
    model.train(first == "train")
    lhcompile.apply(model, CFG, compiler="eager")
    with torch.no_grad(), lighthouse_at({1, 2}):
        lighthouse = logits(twin, ids)
    with torch.no_grad():
        dense = logits(twin, ids)
    for mode in ([True, False, True, False] if first == "train" else [False, True, False, True]):
        model.train(mode)
        got = logits(model, ids)
        torch.testing.assert_close(got, lighthouse if mode else dense, rtol=1e-6, atol=1e-6,
                                   msg=f"{'train' if mode else 'eval'} mode")

