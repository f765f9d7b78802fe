"""lhcompile in torchtitan (0.3.0): the pass on the parallelized model, and the dense recovery stage.

torchtitan's language models attend with FlexAttention (``flex``, ``flex_flash``) or ``VarlenAttention``, always
block-causal by document: the trainer builds the document masks from the per-document positions. The pass
rewrites both into Lighthouse per document (``lhcompile.passes.kinds``), so a Lighthouse run changes the model
spec in one place, from a user's config registry (``--module my_pkg --config NAME``):

- ``lighthouse(spec, config)``: ``lhcompile.apply`` on the model that ``parallelize_fn`` returns, i.e. after
  torchtitan's activation checkpointing, per-block compile and per-layer FSDP2, so ``dense_layers`` counts layers
  (the paper's ``(0, 1, -2, -1)``). Each document of at least ``config.min_lighthouse_len`` tokens gets Lighthouse
  as if it were the whole sequence, each shorter one dense attention; nothing crosses a document boundary. After
  the first training step the site report (which layers run Lighthouse, which stay dense and why) goes to
  torchtitan's log.
- ``dense(spec)``: the recovery stage and the dense baseline, which is torchtitan's stock spec: the same
  attention, the same state_dict keys, so the recovery run resumes stage 1's checkpoint, optimizer state included.

``attention="sdpa"`` (both functions) instead gives every attention layer torchtitan's own
``ScaledDotProductAttention`` (``SdpaAttention``, a ``ModelConfigConverter``): plain causal attention over the
packed sequence, documents attending across their boundaries, as the Lighthouse paper trained; only for users who
want exactly that. ``examples/torchtitan/`` has a registry module and commands.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.tools.logging import logger

import lhcompile

from ..config import LighthouseConfig


class SdpaAttention(ModelConfigConverter):
    """Every attention layer of a decoder's config gets ``ScaledDotProductAttention`` as its inner attention."""

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        pass

    def __init__(self, config: Config) -> None:
        self.config = config

    def convert(self, model_config):
        converted = 0
        for layer in getattr(model_config, "layers", []):
            attention = getattr(layer, "attention", None)
            if attention is not None and hasattr(attention, "inner_attention"):
                attention.inner_attention = ScaledDotProductAttention.Config()
                converted += 1
        if not converted:
            raise ValueError(
                f"lhcompile.integrations.torchtitan.SdpaAttention: {type(model_config).__qualname__} has no layer "
                "with an attention.inner_attention to make SDPA; only decoder configs with attention layers work"
            )
        return model_config


Attention = Literal["model", "sdpa"]
"""The model's own attention (FlexAttention or varlen, documents kept apart), or plain causal SDPA."""


def _model(spec: ModelSpec, attention: Attention):
    if attention not in ("model", "sdpa"):
        raise ValueError(f"lhcompile.integrations.torchtitan: attention={attention!r}; use 'model' (torchtitan's own, "
                         "documents kept apart) or 'sdpa' (plain causal over the packed sequence)")
    return spec.model if attention == "model" else SdpaAttention(SdpaAttention.Config()).convert(
        copy.deepcopy(spec.model))


def dense(spec: ModelSpec, *, attention: Attention = "model") -> ModelSpec:
    """The recovery stage and the dense baseline: ``spec`` itself (or with plain causal SDPA), no pass."""
    return dataclasses.replace(spec, model=_model(spec, attention))


def lighthouse(spec: ModelSpec, config: LighthouseConfig | None = None, *, compiler: str | None = None,
               filter_fn: Callable[[str], bool] | None = None, attention: Attention = "model") -> ModelSpec:
    """``spec`` with its ``parallelize_fn`` followed by ``lhcompile.apply``: Lighthouse per document on
    torchtitan's own attention (``attention="sdpa"``: on plain causal SDPA across documents).

    ``compiler`` defaults to the job's ``--compile.backend`` when the model is compiled, else "inductor" (the
    pass captures the model with Dynamo either way).
    """
    config = config or LighthouseConfig()
    parallelize = spec.parallelize_fn

    def parallelize_then_lighthouse(model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        model = parallelize(model, *args, **kwargs)
        compile_config = kwargs.get("compile_config")
        compiled = compile_config is not None and compile_config.enable and "model" in compile_config.components
        lhcompile.apply(model, config, compiler=compiler or (compile_config.backend if compiled else "inductor"),
                        filter_fn=filter_fn)
        _log_report_after_first_training_step(model)
        return model

    parallelize_then_lighthouse.config = config  # what a job's spec applies, for its logs and configs' tests
    return dataclasses.replace(spec, model=_model(spec, attention), parallelize_fn=parallelize_then_lighthouse)


def _log_report_after_first_training_step(model: torch.nn.Module) -> None:
    # sites are decided as Dynamo captures them, on the first forward: only then can the log say what ran where (the
    # first call runs the forward once more before that, to find the model's layers: its hooks run then too)
    def log_once(module: torch.nn.Module, args: Any, output: Any) -> None:
        report = lhcompile.inspect(module)
        if module.training and len(report):
            handle.remove()
            logger.info(str(report))

    handle = model.register_forward_hook(log_once)
