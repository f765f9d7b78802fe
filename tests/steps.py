"""What tests hold an applied model to: its own code with chosen attention calls sent to the operator, one
training step of it, and the graphs a run compiled."""

from __future__ import annotations

import torch

import lhcompile
from lhcompile import LighthouseConfig, lighthouse_attention

from .conftest import Recorder
from .models import SdpaAt, logits


CFG = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=(0, -1))


N = 64


def lighthouse_at(sites: set[int], config: LighthouseConfig = CFG) -> SdpaAt:
    return SdpaAt(sites, lambda q, k, v, scale: lighthouse_attention(q, k, v, config, scale=scale))


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def assert_same_training_step(model, twin, ids, sites, config=CFG, tol=1e-6):
    """Logits and every gradient of ``model`` equal ``twin``'s own code with ``sites`` sent to the operator."""
    out = logits(model, ids)
    _loss(out).backward()
    with lighthouse_at(sites, config):
        want = logits(twin, ids)
    _loss(want).backward()
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")


def captured(model, config, ids, **kwargs):
    """Apply with a compiler that keeps the rewritten graphs, run once; returns them."""
    graphs = Recorder()
    lhcompile.apply(model, config, compiler=graphs, **kwargs)
    logits(model, ids)
    return graphs

