"""A module that ``apply`` compiled in place: its compiled call per mode, kept through what users do to models.

``apply`` compiles the model (and, where layers are compiled on their own, each kind of layer) twice, for
training (rewritten) and for eval (dense), and lets the module's ``training`` flag choose at every call. The
``Applied`` state sits on the model and follows it:

- ``copy.deepcopy`` (EMA and reference copies): the copy gets compiled calls of its own and runs Lighthouse like
  the original, with a report of its own; ``pickle`` / ``torch.save``: torch drops compiled calls from pickles and
  ``filter_fn`` or the process group may not pickle, so the loaded copy is plainly not applied (``inspect`` is
  empty, ``apply`` works) and the pickling says so; a shallow ``copy.copy`` shares its layers with the original
  and is not applied itself either;
- ``module.compile(...)`` after ``apply``: Lighthouse stays; the user's compile is kept for ``restore`` to give
  back, and that is said;
- input shapes beyond Dynamo's recompile limit: Dynamo then runs the model eagerly, so dense; said.
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves

from .backend import LighthouseBackend
from .blocks import Block
from .lighthouse_pass import Scope
from .options import Options
from .report import LighthouseWarning, Report

STATE = "_lhcompile"
"""The attribute of an applied module that holds its ``Applied`` state."""


@dataclass(frozen=True)
class Kind:
    """Modules that share one backend per mode, so that Dynamo reuses one graph for all of them: the model
    itself (``blocks`` empty), or the layers of one kind compiled on their own (see ``lhcompile.blocks``)."""

    blocks: tuple[Block, ...]
    modules: tuple[torch.nn.Module, ...]


@dataclass
class Applied:
    """What ``apply`` did to a model: with which options, what it found, which modules it compiled and the
    compiled call each had before (given back by ``restore``)."""

    model: torch.nn.Module = field(repr=False, compare=False)
    options: Options
    report: Report
    kinds: tuple[Kind, ...]
    previous: dict[torch.nn.Module, Callable | None]

    @classmethod
    def install(cls, model: torch.nn.Module, options: Options, kinds: tuple[Kind, ...]) -> Applied:
        """Compile every module of ``kinds`` in place, per mode, and keep the state on ``model``."""
        state = cls(model, options, Report(), kinds, {})
        for kind in kinds:
            backends = _backends(options, state.report, kind, model)
            for module in kind.modules:
                state.previous[module] = module.__dict__.get("_compiled_call_impl")
                _compile_per_mode(module, backends)
                # Module.compile would overwrite the compiled call: this instance attribute answers instead
                object.__setattr__(module, "compile", functools.partial(_compile_after_apply, model, module))
        object.__setattr__(model, STATE, state)
        return state

    def uninstall(self) -> None:
        """Give every compiled module back the compiled call it had before ``apply`` (``restore``)."""
        for module, previous in self.previous.items():
            module._compiled_call_impl = previous
            module.__dict__.pop("compile", None)
        object.__delattr__(self.model, STATE)

    def __deepcopy__(self, memo: dict) -> Applied:
        # deepcopy makes the model's copy (kept in memo) before it copies the model's attributes, this state last
        # among them: the copies of the compiled layers are whole by now, the model's is being filled in
        model = copy.deepcopy(self.model, memo)
        kinds = tuple(Kind(kind.blocks, tuple(copy.deepcopy(m, memo) for m in kind.modules)) for kind in self.kinds)
        state = Applied.install(model, self.options, kinds)
        state.previous = dict.fromkeys(state.previous)  # torch drops compiled calls from copies
        return state

    def __reduce__(self) -> tuple:
        warnings.warn("lhcompile: pickling an applied model (torch.save, pickle): the loaded copy is not applied, "
                      "since torch drops compiled calls from pickles; call lhcompile.apply on it after loading "
                      "(state_dict() checkpoints need nothing: their keys are the model's own)",
                      LighthouseWarning, stacklevel=2)
        return _not_applied, ()


def _not_applied() -> None:
    return None


def applied(model: torch.nn.Module) -> Applied | None:
    """The model's state, if apply was called on it (a shallow copy shares the original's state: not its own)."""
    state = model.__dict__.get(STATE)
    return state if state is not None and state.model is model else None


def _backends(options: Options, report: Report, kind: Kind, model: torch.nn.Module) -> dict[bool, LighthouseBackend]:
    root = kind.modules[0] if kind.blocks else model
    return {training: LighthouseBackend(options, Scope(training=training, root=root, blocks=kind.blocks), report)
            for training in (True, False)}


def _compile_per_mode(module: torch.nn.Module, backends: dict[bool, LighthouseBackend]) -> None:
    """Compile the module in place twice, for training (rewritten) and for eval (dense), and let its ``training``
    flag choose at every call: Dynamo guards on the flag only where the model's code reads it."""
    # dynamic=False: each length gets its own graph, so the short-sequence rule is decided exactly
    compiled = {training: torch.compile(module._call_impl, dynamic=False, backend=backend)
                for training, backend in backends.items()}

    @torch.compiler.disable  # a later torch.compile(model) must call this, not trace through it and lose the rewrite
    def call(*args, **kwargs):
        backend = backends[module.training]
        captured = backend.captures
        out = compiled[module.training](*args, **kwargs)
        if torch.compiler.is_exporting():  # export traces the module's own code: no graph is captured, by design
            return out
        shapes = _shapes(args, kwargs)
        if shapes not in backend.shapes:
            backend.shapes.add(shapes)
            if backend.captures == captured:
                _warn_recompile_limit(module, backend, shapes)
        return out

    # object.__setattr__: also on a deep copy whose attributes are not set yet (see Applied.__deepcopy__)
    object.__setattr__(module, "_compiled_call_impl", call)


def _shapes(args: tuple, kwargs: dict) -> tuple:
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                 for x in tree_leaves((args, kwargs)))


def _warn_recompile_limit(module: torch.nn.Module, backend: LighthouseBackend, shapes: tuple) -> None:
    mode = "training" if backend.scope.training else "eval"
    if f"recompile limit {mode}" in backend.report.warned:
        return
    backend.report.warned.add(f"recompile limit {mode}")
    limit = torch._dynamo.config.recompile_limit
    warnings.warn(
        f"lhcompile: {type(module).__name__} was called in {mode} mode with input shapes it had not seen "
        f"({', '.join(map(str, shapes[:3]))}), and Dynamo captured no graph for them: it has reached its "
        f"recompile limit (torch._dynamo.config.recompile_limit={limit} graphs per forward, every sequence length "
        "and mode counted), or it is disabled (TORCHDYNAMO_DISABLE), and runs the model eagerly, with dense "
        "attention. Use few distinct sequence lengths (pad or bucket them), or raise "
        "torch._dynamo.config.recompile_limit",
        LighthouseWarning, stacklevel=4)


def _compile_after_apply(model: torch.nn.Module, module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
    """``module.compile(...)`` on a module that ``apply`` compiled: Lighthouse stays, the user's compile is kept
    for ``restore`` (on a module that is no longer applied, e.g. a loaded pickle, it is plain Module.compile)."""
    state = applied(model)
    if state is None or module not in state.previous:
        module.__dict__.pop("compile", None)
        type(module).compile(module, *args, **kwargs)
        return
    state.previous[module] = torch.compile(module._call_impl, *args, **kwargs)
    warnings.warn(
        f"lhcompile: {type(module).__name__}.compile() after lhcompile.apply: the model goes on running the graphs "
        f"lhcompile compiles (compiler={state.options.compiler!r}), Lighthouse included; this compile takes over "
        "at lhcompile.restore(model)", LighthouseWarning, stacklevel=2)
