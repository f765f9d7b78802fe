"""The Lighthouse stages as torch.library ops (score, select, gather, scatter, and the rows of the relayout of
packed documents).

Each stage is one named op (namespace ``lhcompile``) so that traced graphs stay readable and the graph
pass can find and restore them. The ops are ``triton_op``s whose bodies call the implementation registered for
the tensors' device type (``IMPLEMENTATIONS``, ``DEVICES``): on CUDA tensors the Triton kernels of ``kernels``
(and torch.compile sees those kernels), on every other device ``reference``, the pure-PyTorch oracle the tests
hold every fast path to, which is then the CPU path itself. Both have the same stage signatures. The choice is
made per device type, so under torch.compile it is fixed by the traced tensors' device. (A per-device
``torch.library`` kernel would not do: torch.compile traces a triton_op's own body on every device.)
``use_stages`` swaps a device's implementation for tests: the kernels on CPU under ``TRITON_INTERPRET=1``, or the
oracle on a GPU.

Tensor layout: q/k/v (B, H, N, d); a selection ``index`` (B, H, S) int64 of flat pyramid indices in
position-key order and its inverse ``inv`` (B, H, P) int32 (slot of each pyramid entry, or -1).
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..geometry import Geometry

def _reference() -> ModuleType:
    from . import reference

    return reference


def _kernels() -> ModuleType:
    from . import kernels  # Triton: imported where a CUDA tensor first runs a stage

    return kernels


IMPLEMENTATIONS: dict[str, Callable[[], ModuleType]] = {"reference": _reference, "kernels": _kernels}
"""The implementations of the stages, by name: each a module with ``reference``'s stage functions."""
DEVICES: dict[str, str] = {"cuda": "kernels"}
"""Device type -> the implementation of its stages ('reference' where absent). Process-wide by nature: the ops'
bodies read it, on every device; ``use_stages`` changes it for a while."""


def _stages(t: Tensor) -> ModuleType:
    return IMPLEMENTATIONS[DEVICES.get(t.device.type, "reference")]()


@contextlib.contextmanager
def use_stages(device_type: str, implementation: str) -> Iterator[None]:
    """Run the stages of ``device_type`` tensors with ``implementation`` ('kernels' or 'reference') for a while
    (eager calls; a graph compiled inside keeps the choice it traced)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"use_stages: implementation={implementation!r}; expected one of {sorted(IMPLEMENTATIONS)}")
    before = DEVICES.get(device_type)
    DEVICES[device_type] = implementation
    try:
        yield
    finally:
        if before is None:
            del DEVICES[device_type]
        else:
            DEVICES[device_type] = before


# -- score and select (no gradient: the caller passes detached tensors) ------------------------------


@torch.library.triton_op("lhcompile::score", mutates_args=())
def score(q: Tensor, k: Tensor, levels: int, p: int) -> tuple[Tensor, Tensor]:
    return _stages(q).score(q, k, levels, p)


@torch.library.triton_op("lhcompile::select", mutates_args=())
def select(
    s_qk: Tensor, s_kq: Tensor, n: int, levels: int, p: int, topk: int, tile_budget: int
) -> tuple[Tensor, Tensor]:
    if torch.compiler.is_exporting():
        # every Lighthouse subgraph has one select: exporting it would give an ONNX graph nobody can run
        raise RuntimeError(
            "lhcompile: this graph still contains Lighthouse attention (training only); call "
            "lhcompile.restore(model) before torch.export / torch.onnx.export to get the dense SDPA graph back"
        )
    return _stages(s_qk).select(s_qk, s_kq, Geometry(n, levels, p, topk, tile_budget))


@torch.library.custom_op("lhcompile::select_documents", mutates_args=())
def select_documents(s_qk: Tensor, s_kq: Tensor, docs: Tensor, gathered_len: int, n: int, levels: int, p: int,
                     topk: int, tile_budget: int) -> tuple[Tensor, Tensor]:
    """``select`` for each document of a relaid stream (``lhcompile.documents``) on its own. A custom op, not a
    triton_op: the reference walks the documents on the host, so tracing must not enter it."""
    if torch.compiler.is_exporting():
        raise RuntimeError(
            "lhcompile: this graph still contains Lighthouse attention (training only); call "
            "lhcompile.restore(model) before torch.export / torch.onnx.export to get the dense graph back"
        )
    return _stages(s_qk).select_documents(s_qk, s_kq, docs, gathered_len, Geometry(n, levels, p, topk, tile_budget))


@select_documents.register_fake
def _(s_qk, s_kq, docs, gathered_len, n, levels, p, topk, tile_budget):
    b, h, total = s_qk.shape
    return s_qk.new_empty(b, h, gathered_len, dtype=torch.int64), s_qk.new_empty(b, h, total, dtype=torch.int32)


# -- gather: pooled rows straight from the base tensor ---------------------------------------------


@torch.library.triton_op("lhcompile::gather", mutates_args=())
def gather(x: Tensor, index: Tensor, inv: Tensor, levels: int, p: int) -> Tensor:
    return _stages(x).gather(x, index, inv, levels, p)


def _gather_setup(ctx, inputs, output) -> None:
    x, index, inv, ctx.levels, ctx.p = inputs
    ctx.save_for_backward(index, inv)
    ctx.n, ctx.kv_heads = x.shape[2], x.shape[1]


def _gather_backward(ctx, grad):
    index, inv = ctx.saved_tensors
    grad_x = _stages(grad).gather_backward(grad, index, inv, ctx.n, ctx.kv_heads, ctx.levels, ctx.p)
    return grad_x, None, None, None, None


gather.register_autograd(_gather_backward, setup_context=_gather_setup)


# -- scatter ---------------------------------------------------------------------------------------


@torch.library.triton_op("lhcompile::scatter", mutates_args=())
def scatter(o: Tensor, index: Tensor, inv: Tensor, n: int, levels: int, p: int) -> Tensor:
    return _stages(o).scatter(o, index, inv, n, levels, p)


def _scatter_setup(ctx, inputs, output) -> None:
    _, index, inv, _, ctx.levels, ctx.p = inputs
    ctx.save_for_backward(index, inv)


def _scatter_backward(ctx, grad):
    index, inv = ctx.saved_tensors
    return _stages(grad).scatter_backward(grad, index, inv, ctx.levels, ctx.p), None, None, None, None, None


scatter.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# -- rows through a map (the relayout of packed documents) ------------------------------------------


def take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """Row ``rows[i]`` of x (M, W), or zeros where it is -1; the kernel on CUDA, the reference elsewhere."""
    return _stages(x).take_rows(x, rows)
