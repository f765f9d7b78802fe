"""A module that ``apply`` compiled in place: its compiled call per mode, kept through what users do to models.

``apply`` compiles each kind of layer of the model's layer stack (or, compiled whole, the model) twice, for
training (rewritten) and for eval (dense), and lets the module's ``training`` flag choose at every call; a model
whose layers are compiled on their own runs its own code as written around them. The ``Applied`` state sits on
the model and follows it:

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

import contextlib
import copy
import functools
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .backend import Backend
from .blocks import Block
from .lighthouse_pass import Scope, warn_if_nothing_rewritten
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
    compiled: bool = True
    """False: the model's own call runs as written around its layers compiled on their own (regional)."""


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
    def install(cls, model: torch.nn.Module, options: Options, kinds: tuple[Kind, ...], hooks: bool = True
                ) -> Applied:
        """Compile every module of ``kinds`` in place, per mode, and keep the state on ``model``; with ``hooks``,
        hook the model's children to notice them run outside its compiled call (a deep copy copies the hooks)."""
        state = cls(model, options, Report(), kinds, {})
        if hooks and any(not kind.blocks and kind.compiled for kind in kinds):
            # a block compiled on its own runs Lighthouse wherever it is called; a hook on it would also make Dynamo
            # call its compiled call instead of inlining it into the model's graph
            blocks = {module for kind in kinds if kind.blocks for module in kind.modules}
            for path, part in _parts(model):
                if part not in blocks:
                    part.register_forward_pre_hook(_CalledAround(model, path))
        for kind in kinds:
            backends = _backends(options, state.report, kind, model)
            calls = {training: _Calls() for training in backends}  # one kind's layers share their graphs
            for module in kind.modules:
                state.previous[module] = module.__dict__.get("_compiled_call_impl")
                whole = None if kind.blocks else state.report  # the model's own call: it sees every layer run
                if kind.compiled:
                    _compile_per_mode(module, backends, calls, whole, sum(k.compiled for k in kinds))
                else:
                    _run_as_written(module, whole)
                # Module.compile would overwrite the compiled call: this instance attribute answers instead
                object.__setattr__(module, "compile", functools.partial(_compile_after_apply, model, module))
        object.__setattr__(model, STATE, state)
        return state

    def uninstall(self) -> None:
        """Give every compiled module back the compiled call it had before ``apply`` (``restore``)."""
        for module, previous in self.previous.items():
            module._compiled_call_impl = previous
            module.__dict__.pop("compile", None)
        for _, part in _parts(self.model):
            for key, hook in list(part._forward_pre_hooks.items()):
                if isinstance(hook, _CalledAround) and hook.model is self.model:
                    del part._forward_pre_hooks[key]
        object.__delattr__(self.model, STATE)

    def __deepcopy__(self, memo: dict) -> Applied:
        # deepcopy makes the model's copy (kept in memo) before it copies the model's attributes, this state last
        # among them: the copies of the compiled layers are whole by now, the model's is being filled in
        model = copy.deepcopy(self.model, memo)
        kinds = tuple(Kind(kind.blocks, tuple(copy.deepcopy(m, memo) for m in kind.modules), kind.compiled)
                      for kind in self.kinds)
        state = Applied.install(model, self.options, kinds, hooks=False)
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


_INSIDE = threading.local()
"""How many of lhcompile's compiled calls run on this thread (a part of the model run outside them is dense)."""


def _parts(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's children and theirs (model.model, model.blocks.0): what a caller may run on its own."""
    return [(path, module) for path, module in model.named_modules() if path and path.count(".") <= 1]


class _CalledAround:
    """A pre-hook on a part of an applied model: says when that part runs outside the model's compiled call
    (``model.forward(...)``, ``model.model(...)``, PEFT's tuners calling ``base.forward``), dense and uncompiled.
    Traced away under compile; a class, so that an applied model pickles."""

    def __init__(self, model: torch.nn.Module, path: str) -> None:
        self.model, self.path = model, path

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling() or getattr(_INSIDE, "depth", 0):
            return
        state = applied(self.model)
        if state is None or not any(site.module_path.startswith(f"{self.path}.") or site.module_path == self.path
                                    for site in state.report):
            return  # not applied any more, or no attention in this part (e.g. a head a loss calls on its own)
        note = (f"lhcompile: {type(self.model).__name__}.{self.path} ran outside the compiled call that lhcompile "
                f"installed on {type(self.model).__name__} (model.forward(...) called directly, a submodule called on "
                "its own, or a wrapper such as PEFT's tuners calling base.forward), so its attention ran dense and "
                "uncompiled; call the model itself, model(...), or lhcompile.apply the module you call (for PEFT: "
                "apply to the PeftModel after get_peft_model)")
        if state.report.once.warn("called around", note, stacklevel=3):
            state.report.notes.append(note)


def applied(model: torch.nn.Module) -> Applied | None:
    """The model's state, if apply was called on it (a shallow copy shares the original's state: not its own)."""
    state = model.__dict__.get(STATE)
    return state if state is not None and state.model is model else None


def _backends(options: Options, report: Report, kind: Kind, model: torch.nn.Module) -> dict[bool, Backend]:
    root = kind.modules[0] if kind.blocks else model
    return {training: Backend(options, Scope(training=training, root=root, blocks=kind.blocks, model=model), report)
            for training in (True, False)}


@dataclass
class _Calls:
    """How the modules of one kind were called in one mode."""

    shapes: list[tuple] = field(default_factory=list)
    """The input shapes they were called with."""
    dynamic: bool = False
    """Gone to dynamic shapes: a packed batch's length is data."""


def _compile_per_mode(module: torch.nn.Module, backends: dict[bool, Backend], calls: dict[bool, _Calls],
                      whole: Report | None, kinds: int) -> None:
    """Compile the module in place twice, for training (rewritten) and for eval (dense), and let its ``training``
    flag choose at every call: Dynamo guards on the flag only where the model's code reads it. ``calls``: per mode,
    how the modules sharing these backends were called; ``whole``: the model's report, where the module is the
    model (said after a training call if it rewrote nothing); ``kinds``: how many kinds of module are compiled in
    place."""
    # dynamic=False: each length gets its own graph, so the short-sequence rule is decided exactly. Where sites run
    # per document (their lengths are data), new inputs go to Dynamo's automatic dynamic shapes instead: the sizes
    # and ints that changed (a packed batch's total length, varlen's longest document) become dynamic, so one more
    # graph serves every later batch
    compiled = {training: torch.compile(module._call_impl, dynamic=False, backend=backend)
                for training, backend in backends.items()}
    dynamic = {training: torch.compile(module._call_impl, dynamic=None, backend=backend)
               for training, backend in backends.items()}

    @torch.compiler.disable  # a later torch.compile(model) must call this, not trace through it and lose the rewrite
    def call(*args, **kwargs):
        _INSIDE.depth = getattr(_INSIDE, "depth", 0) + 1
        try:
            with _unwatched():
                return _call(*args, **kwargs)
        finally:
            _INSIDE.depth -= 1

    def _call(*args, **kwargs):
        mode = module.training
        backend, shapes, seen = backends[mode], _shapes(args, kwargs), calls[mode]
        new = shapes not in seen.shapes
        seen.dynamic = seen.dynamic or (new and bool(seen.shapes) and backend.documents)
        runs = backend.runs
        # Dynamo counts its recompile limit per code, and every module compiled here shares nn.Module's call: each
        # kind of layer gets the limit the user set
        share = torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit * kinds) \
            if kinds > 1 else contextlib.nullcontext()
        with share:
            out = (dynamic if seen.dynamic else compiled)[mode](*args, **kwargs)
        if torch.compiler.is_exporting():  # export traces the module's own code: no graph is captured, by design
            return out
        if new:
            seen.shapes.append(shapes)
        if backend.runs == runs:
            _warn_ran_eagerly(module, backend, shapes, new)
        if whole is not None and mode:
            _warn_if_nothing_rewritten(whole)
        return out

    # object.__setattr__: also on a deep copy whose attributes are not set yet (see Applied.__deepcopy__)
    object.__setattr__(module, "_compiled_call_impl", call)


def _run_as_written(module: torch.nn.Module, whole: Report) -> None:
    """The model's own call, uncompiled: a torch.compile of the model around it defers to it, so that Dynamo does
    not trace the layers it holds, each compiled on its own, into one dense graph. Its first training call says
    whether the model's own code calls attention outside those layers (uncompiled, so dense)."""
    watched = False

    @torch.compiler.disable
    def call(*args, **kwargs):
        nonlocal watched
        if module.training and not watched:
            watched = True
            with _AttentionOutsideLayers() as watch:
                out = module._call_impl(*args, **kwargs)
            _warn_about_attention_outside(module, whole, watch)
        else:
            out = module._call_impl(*args, **kwargs)
        if module.training:
            _warn_if_nothing_rewritten(whole)
        return out

    object.__setattr__(module, "_compiled_call_impl", call)


class _AttentionOutsideLayers(TorchFunctionMode):
    """Counts the attention calls a model's own code makes around its layers compiled on their own (a layer's call
    pops this mode: Dynamo must not trace it into the layer's graph)."""

    NAMES = frozenset({"scaled_dot_product_attention", "flex_attention", "varlen_attn", "document_attention"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "").removesuffix(".default")
        if name in self.NAMES:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _warn_about_attention_outside(model: torch.nn.Module, report: Report, watch: _AttentionOutsideLayers) -> None:
    if not watch.calls:
        return
    calls = ", ".join(f"{name} x{count}" for name, count in watch.calls.items())
    note = (f"lhcompile: {type(model).__name__}'s own code calls attention outside its layer stack ({calls}); "
            "regional compilation compiles only the layers, so those calls run uncompiled and dense. Apply with "
            "regional=False to compile the whole model, where the pass sees them too")
    if report.once.warn("attention outside the layers", note, stacklevel=4):
        report.notes.append(note)


def _unwatched() -> contextlib.AbstractContextManager:
    if isinstance(torch.overrides._get_current_function_mode(), _AttentionOutsideLayers):
        return torch.overrides._pop_mode_temporarily()
    return contextlib.nullcontext()


def _warn_if_nothing_rewritten(report: Report) -> None:
    warn_if_nothing_rewritten(report, [s for s in report.sites if s.training])


def _shapes(args: tuple, kwargs: dict) -> tuple:
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x if isinstance(x, int) else type(x).__name__
                 for x in tree_leaves((args, kwargs)))


def _warn_ran_eagerly(module: torch.nn.Module, backend: Backend, shapes: tuple, new: bool) -> None:
    mode = "training" if backend.scope.training else "eval"
    limit = torch._dynamo.config.recompile_limit
    what = (f"with input shapes it had not seen ({', '.join(map(str, shapes[:3]))})" if new else
            "with input shapes it had seen, but something else Dynamo guards on changed (grad mode, e.g. a forward "
            "under torch.no_grad(); autocast; a module attribute)")
    note = (f"lhcompile: {type(module).__name__} was called in {mode} mode {what}, and none of the graphs lhcompile "
            f"compiled ran: Dynamo has reached its recompile limit (torch._dynamo.config.recompile_limit={limit} "
            "graphs per forward, every sequence length, mode and guard counted), or it is disabled "
            "(TORCHDYNAMO_DISABLE), and runs the model eagerly, with dense attention. Use few distinct sequence "
            "lengths (pad or bucket them), keep grad and autocast modes alike across calls, or raise "
            "torch._dynamo.config.recompile_limit")
    if backend.report.once.warn(f"ran eagerly {mode}", note, stacklevel=4):
        backend.report.notes.append(note)


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
