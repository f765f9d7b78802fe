"""Integrations with the frameworks people pre-train with; each is imported on its own and needs its framework:
``lhcompile.integrations.torchtitan`` (torchtitan) and ``lhcompile.integrations.hf`` (the Hugging Face Trainer)."""
