"""Integrations with the frameworks people pre-train with, one module per framework, each needing its framework:
``lhcompile.integrations.hf`` (Hugging Face transformers: ``attn_implementation="causal_sdpa"`` and the Trainer
callback) and ``lhcompile.integrations.torchtitan``. A submodule is imported on first use
(``lhcompile.integrations.hf.LighthouseCallback`` works after a plain ``import lhcompile``)."""

import importlib

_FRAMEWORKS = ("hf", "torchtitan")


def __getattr__(name: str):
    if name in _FRAMEWORKS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
