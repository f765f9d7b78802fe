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
from lhcompile import LighthouseConfig, LighthouseWarning

from .models import GPT, VOCAB, hf_model, logits
from .test_no_silent_failures import CFG, N, assert_same_training_step, lighthouse_at


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


def test_arguments_that_cannot_work_fail_or_warn_at_apply(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)  # `import flash_attn` fails
    with pytest.raises(ValueError, match="inner_attention='flash_attn'.*cannot be imported"):
        lhcompile.apply(GPT(), LighthouseConfig(inner_attention="flash_attn"))
    # torchrun started 2 processes, and dist.group.WORLD is None until init_process_group
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(LighthouseWarning, match="before torch.distributed is initialized"):
        lhcompile.apply(GPT(), CFG, compiler="eager", context_parallel=None)


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

