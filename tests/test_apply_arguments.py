"""What ``apply`` is given is checked there: arguments of the wrong kind, settings that can never engage, and
``inspect`` of something that is no model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lhcompile
from lhcompile import LighthouseConfig, LighthouseWarning

from .models import GPT, VOCAB, hf_model, logits
from .steps import CFG, N


def test_settings_that_can_never_engage_are_warned_about():
    model = hf_model("llama")  # max_position_embeddings=512
    with pytest.warns(LighthouseWarning, match="at least 32768 tokens .* max_position_embeddings=512"):
        lhcompile.apply(model, LighthouseConfig(), compiler="eager")
    # dense_layers counts the model's attention sites, layer by layer or compiled whole: said at the first call, when
    # the model's forward has shown them
    for regional in (True, False):
        torch._dynamo.reset()
        model = GPT()
        lhcompile.apply(model, dataclasses.replace(CFG, dense_layers=(0, 7, -9)), compiler="eager", regional=regional)
        with pytest.warns(LighthouseWarning, match=r"dense_layers entries \[7, -9\] are outside the 4 attention sites"):
            logits(model, torch.randint(0, VOCAB, (1, N)))


@pytest.mark.parametrize("kwargs,error,words", [
    ({"compiler": "nonexistent"}, ValueError, ["compiler='nonexistent'", "inductor", "eager", "aot_eager"]),
    ({"compiler": 3}, TypeError, ["compiler must be a backend name or a callable"]),
    ({"config": {"topk": 8}}, TypeError, ["config must be a lhcompile.LighthouseConfig", "dict"]),
    ({"filter_fn": "layers.1"}, TypeError, ["filter_fn must be a callable"]),
])
def test_bad_arguments_fail_at_apply_naming_the_argument(kwargs, error, words):
    model = GPT()
    config = kwargs.pop("config", CFG)
    with pytest.raises(error) as raised:
        lhcompile.apply(model, config, **kwargs)
    for word in words:
        assert word in str(raised.value)
    assert model._compiled_call_impl is None  # nothing was done


@pytest.mark.parametrize("field", ["levels", "pooling_factor", "topk", "tile_budget", "min_seq_len", "dense_layers"])
def test_bools_are_not_taken_for_ints_in_the_config(field):
    value = (True,) if field == "dense_layers" else True
    with pytest.raises(ValueError, match=f"LighthouseConfig: {field}=.*not .*bool"):
        LighthouseConfig(**{field: value})


def test_inspect_of_something_that_is_no_model_says_what_it_expects():
    with pytest.raises(TypeError, match="lhcompile.inspect expects the model .* got Tensor"):
        lhcompile.inspect(torch.zeros(2))


def test_arguments_that_cannot_work_fail_or_warn_at_apply(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)  # `import flash_attn` fails
    with pytest.raises(ValueError, match="inner_attention='flash_attn'.*cannot be imported"):
        lhcompile.apply(GPT(), LighthouseConfig(inner_attention="flash_attn"))
    # torchrun started 2 processes, and dist.group.WORLD is None until init_process_group
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(LighthouseWarning, match="before torch.distributed is initialized"):
        lhcompile.apply(GPT(), CFG, compiler="eager", context_parallel=None)
