"""A module that ``apply`` compiled in place: its compiled calls per mode, kept through what users do to models.

``apply`` takes over the model's call. Its first call makes the model's ``Plan`` (``lhcompile.plan``: which
modules are its layers, where each attention call stands); then each kind of layer (one class) is compiled twice,
for training (rewritten) and for eval (dense), or, without layers, the model is, and the module's ``training``
flag chooses at every call. A model whose layers are compiled on their own runs its own code as written around
them. Every call of the model is one ``calls.Batch``; every call of a layer (or of the model compiled whole) says
where its attention sites stand (``calls.Sites``), which the graphs it runs read. The ``Applied`` state sits on the
model and follows it:

- ``copy.deepcopy`` (EMA and reference copies): the copy gets compiled calls of its own, made at its first call,
  and runs Lighthouse like the original, with a report of its own; ``pickle`` / ``torch.save``: torch drops
  compiled calls from pickles and ``filter_fn`` or the process group may not pickle, so the loaded copy is plainly
  not applied (``inspect`` is empty, ``apply`` works) and the pickling says so; a shallow ``copy.copy`` shares its
  layers with the original and is not applied itself either;
- ``module.compile(...)`` after ``apply``: Lighthouse stays; the user's compile is kept for ``restore`` to give
  back, and that is said;
- attention that runs outside the compiled graphs (Dynamo's recompile limit, a graph break, code outside the
  layers): dense; said with the cause, and in the report's row of each such site.
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
from torch.utils._pytree import tree_leaves

from .backend import Backend
from .calls import Batch, Sites, current_batch, current_sites, entered
from ..rewrite.decision import Pattern, Scope, pattern_of
from ..rewrite.diagnostics import warn_if_nothing_rewritten
from ..rewrite.options import Options
from .plan import Plan, discover
from ..report import LighthouseWarning, Report, SiteReport

STATE = "_lhcompile"
"""The attribute of an applied module that holds its ``Applied`` state (a GraphModule: its meta key)."""
RESTORED = "_lhcompile_restored"
"""The attribute of a restored module that holds the report of what the pass did before (a GraphModule: its meta
key): what ``inspect`` says of it."""


@dataclass
class Applied:
    """What ``apply`` did to a model: with which options, what it found, which modules it compiled and the
    compiled call each had before (given back by ``restore``)."""

    model: torch.nn.Module = field(repr=False, compare=False)
    options: Options
    report: Report
    previous: dict[torch.nn.Module, Callable | None] = field(default_factory=dict, repr=False)
    plan: Plan | None = None
    """Made at the model's first call."""
    counts: Counter = field(default_factory=Counter, repr=False)
    """Calls of each layer so far in the current model call."""

    @classmethod
    def install(cls, model: torch.nn.Module, options: Options) -> Applied:
        """Take over the model's call (the plan and the compiles follow at its first call)."""
        state = cls(model, options, Report())
        state._take(model, _ModelCall(state))
        for path, part in _callable_parts(model):
            part.register_forward_pre_hook(_CalledAround(model, path), with_kwargs=True)
        model.__dict__.pop(RESTORED, None)
        object.__setattr__(model, STATE, state)
        return state

    def _take(self, module: torch.nn.Module, call: Callable) -> None:
        self.previous.setdefault(module, module.__dict__.get("_compiled_call_impl"))
        # object.__setattr__: also on a deep copy whose attributes are not set yet (see __deepcopy__)
        object.__setattr__(module, "_compiled_call_impl", call)
        # Module.compile would overwrite the compiled call: this instance attribute answers instead
        object.__setattr__(module, "compile", functools.partial(_compile_after_apply, self.model, module))

    def make_plan(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Find the model's layers on its first call's inputs (or the first call of a part of it, ``module``, run
        on its own) and compile them, or the model whole."""
        model, options = self.model, self.options
        with _inside():
            self.plan = plan = discover(model, lambda: module._call_impl(*args, **kwargs), options.regional)
        self._warn_about_dense_layers(plan.total)
        by_class: dict[type, list[torch.nn.Module]] = {}
        for module in plan.layers:
            by_class.setdefault(type(module), []).append(module)
        classes = len(by_class) + (not by_class)  # classes of module compiled in place
        for modules in by_class.values():
            backends = self._backends(modules)
            calls = {training: _Calls() for training in backends}  # one class's layers share their graphs
            for module in modules:
                self._take(module, _LayerCall(self, module, backends, calls, classes))
        call: _ModelCall = model.__dict__["_compiled_call_impl"]
        if not by_class:
            backends = {training: Backend(options, Scope(training=training, root=model, model=model), self.report)
                        for training in (True, False)}
            call.compiled_whole = _Compiled(model, backends, {t: _Calls() for t in backends}, classes)

    def _backends(self, modules: list[torch.nn.Module]) -> dict[bool, Backend]:
        plan, options = self.plan, self.options

        def predict(count: int) -> set[Pattern]:
            return {pattern_of(options, positions, plan.paths(positions), plan.total)
                    for m in modules for positions in plan.calls.get(m, ()) if len(positions) == count}

        scope = dict(root=modules[0], root_path=plan.layers[modules[0]], model=self.model,
                     serves=tuple(plan.layers[m] for m in modules))
        return {training: Backend(options, Scope(training=training, **scope), self.report, predict)
                for training in (True, False)}

    def _warn_about_dense_layers(self, total: int) -> None:
        outside = [i for i in self.options.config.dense_layers if not -total <= i < total]
        if total and outside:
            self.report.note("dense_layers range",
                             f"lhcompile: dense_layers entries {outside} are outside the {total} attention sites of "
                             f"{type(self.model).__name__}; they keep nothing dense", stacklevel=5)

    def uninstall(self) -> None:
        """Give every compiled module back the compiled call it had before ``apply``, and keep the report of what the
        pass did as the model's restored report (``restore``)."""
        for module, previous in self.previous.items():
            module._compiled_call_impl = previous
            module.__dict__.pop("compile", None)
        for _, part in _callable_parts(self.model):
            for key, hook in list(part._forward_pre_hooks.items()):
                if isinstance(hook, _CalledAround) and hook.model is self.model:
                    del part._forward_pre_hooks[key]
        object.__delattr__(self.model, STATE)
        self.report.state = "restored"
        object.__setattr__(self.model, RESTORED, self.report)

    def __deepcopy__(self, memo: dict) -> Applied:
        # deepcopy makes the model's copy (kept in memo) before it copies the model's attributes, this state last
        # among them. torch drops compiled calls from copies; the copy plans and compiles at its own first call
        model = copy.deepcopy(self.model, memo)
        for module in self.previous:
            twin = memo.get(id(module))
            if twin is not None and twin is not model:
                twin.__dict__.pop("compile", None)
        state = Applied(model, self.options, Report())
        state._take(model, _ModelCall(state))
        state.previous = dict.fromkeys(state.previous)
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


def report_of(model: torch.nn.Module) -> Report | None:
    """The report of an applied model, or of a restored one (what the pass did before), else None."""
    state = applied(model)
    return state.report if state is not None else model.__dict__.get(RESTORED)


def graph_report(gm: torch.fx.GraphModule) -> Report | None:
    """The report of a GraphModule rewritten in place, or restored, else None."""
    return gm.meta.get(STATE, gm.meta.get(RESTORED))


def set_graph_report(gm: torch.fx.GraphModule, report: Report | None) -> None:
    """Keep a GraphModule's report: rewritten in place (``report``), or restored (None: the one it had, as said
    before)."""
    if report is not None:
        gm.meta.pop(RESTORED, None)
        gm.meta[STATE] = report
        return
    before = gm.meta.pop(STATE, None)
    if before is not None:
        before.state = "restored"
        gm.meta[RESTORED] = before


_INSIDE = threading.local()
"""How many of lhcompile's compiled calls run on this thread (a part of the model run outside them is dense)."""


def _callable_parts(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's children and theirs (model.model, model.blocks.0): what a caller may run on its own."""
    return [(path, module) for path, module in model.named_modules() if path and path.count(".") <= 1]


class _CalledAround:
    """A pre-hook on a part of an applied model, for when that part runs outside the model's own call
    (``model.forward(...)``, ``model.model(...)``, PEFT's tuners calling ``base.forward``): before the model's first
    call it makes the plan from the part's call (its layers run compiled from then on); where the model is compiled
    whole, it says that the part runs dense and uncompiled. Traced away under compile; a class, so that an applied
    model pickles."""

    def __init__(self, model: torch.nn.Module, path: str) -> None:
        self.model, self.path = model, path

    def __call__(self, module: torch.nn.Module, args: Any, kwargs: dict) -> None:
        if torch.compiler.is_compiling() or getattr(_INSIDE, "depth", 0):
            return
        state = applied(self.model)
        if state is not None and state.plan is None:
            state.make_plan(module, args, kwargs)
        call = None if state is None else self.model.__dict__.get("_compiled_call_impl")
        if not isinstance(call, _ModelCall) or call.compiled_whole is None or not any(
                s.path.startswith(f"{self.path}.") or s.path == self.path for s in state.plan.sites):
            return  # not applied any more, or no attention in this part (e.g. a head a loss calls on its own)
        state.report.note(
            "called around",
            f"lhcompile: {type(self.model).__name__}.{self.path} ran outside the compiled call that lhcompile "
            f"installed on {type(self.model).__name__} (model.forward(...) called directly, a submodule called on "
            "its own, or a wrapper such as PEFT's tuners calling base.forward), so its attention ran dense and "
            "uncompiled; call the model itself, model(...), or lhcompile.apply the module you call (for PEFT: "
            "apply to the PeftModel after get_peft_model)", stacklevel=3)


@contextlib.contextmanager
def _inside() -> Any:
    _INSIDE.depth = getattr(_INSIDE, "depth", 0) + 1
    try:
        yield
    finally:
        _INSIDE.depth -= 1


@dataclass
class _Calls:
    """How the modules of one kind were called in one mode."""

    shapes: list[tuple] = field(default_factory=list)
    """The input shapes they were called with."""
    dynamic: bool = False
    """Gone to dynamic shapes: a packed batch's length is data."""


_BREAKS: list = [0, Counter()]
"""Dynamo's process-wide count of graph breaks, and a copy of its counter taken at that count: read around every
layer call, copied only when it has moved (module-level as Dynamo's own counter is)."""


def _graph_breaks() -> Counter:
    """A copy of Dynamo's graph-break counter as it stands."""
    counter = torch._dynamo.utils.counters["graph_break"]
    count = sum(counter.values())
    if count != _BREAKS[0]:
        _BREAKS[:] = [count, Counter(counter)]
    return _BREAKS[1]


def _dynamo_config(classes: int) -> contextlib.AbstractContextManager:
    """Dynamo's settings for lhcompile's compiled calls: Dynamo counts its recompile limit per code, and every module
    compiled here shares nn.Module's call, so each kind of layer gets the limit the user set; inside an
    activation-checkpointed region a side effect (transformers' context variables, a counter the model keeps) is
    applied once, in the forward, as without checkpointing, instead of making Dynamo give up the region."""
    patch: dict[str, Any] = {}
    if classes > 1:
        patch["recompile_limit"] = torch._dynamo.config.recompile_limit * classes
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        patch["skip_fwd_side_effects_in_bwd_under_checkpoint"] = True
    return torch._dynamo.config.patch(**patch)


class _Compiled:
    """A module compiled in place twice, for training (rewritten) and for eval (dense); its ``training`` flag
    chooses at every call (Dynamo guards on the flag only where the model's code reads it). ``calls``: per mode, how
    the modules sharing these backends were called; ``classes``: how many classes of module are compiled in place."""

    def __init__(self, module: torch.nn.Module, backends: dict[bool, Backend], calls: dict[bool, _Calls],
                 classes: int, body: Callable | None = None) -> None:
        self.module, self.backends, self.calls, self.classes = module, backends, calls, classes
        self.new = False
        """Whether the last call's input shapes were new to this kind of module in its mode."""
        # dynamic=False: each length gets its own graph, so the short-sequence rule is decided exactly. Where sites
        # run per document (their lengths are data), new inputs go to Dynamo's automatic dynamic shapes instead: the
        # sizes and ints that changed (a packed batch's total length, varlen's longest document) become dynamic, so
        # one more graph serves every later batch
        function = module._call_impl if body is None else body
        self.compiled = {dynamic: {training: torch.compile(function, dynamic=None if dynamic else False,
                                                           backend=backend)
                                   for training, backend in backends.items()} for dynamic in (False, True)}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        mode = self.module.training
        backend, shapes, seen = self.backends[mode], _shapes(args, kwargs), self.calls[mode]
        new = shapes not in seen.shapes
        seen.dynamic = seen.dynamic or (new and bool(seen.shapes) and backend.documents)
        self.new = new
        with _dynamo_config(self.classes):
            out = self.compiled[seen.dynamic][mode](*args, **kwargs)
        if new:
            seen.shapes.append(shapes)
        return out


class _ModelCall:
    """The applied model's own call: its plan at the first call, one ``Batch`` per call; compiled whole where the
    model has no layers, else its own code as written around its layers compiled on their own (a torch.compile of
    the model defers to this call, so that Dynamo does not trace the layers into one dense graph)."""

    def __init__(self, state: Applied) -> None:
        self.state = state
        self.compiled_whole: _Compiled | None = None
        """The model compiled as one, where it has no layers; else None (its code runs as written)."""
        self._told = False

    @torch.compiler.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        model = state.model
        if torch.compiler.is_exporting():  # export traces the module's own code: no graph is captured, by design
            return model._call_impl(*args, **kwargs)
        if state.plan is None:
            state.make_plan(model, args, kwargs)
        state.counts.clear()
        plan = state.plan
        with entered(Batch()), _inside():
            if self.compiled_whole is None:
                out = model._call_impl(*args, **kwargs)
            else:
                sites = Sites(tuple(range(plan.total)), plan.paths(tuple(range(plan.total))), plan.total)
                out = _run(model, self.compiled_whole, sites, state, args, kwargs)
        if model.training:
            self._after_training_call()
        return out

    def _after_training_call(self) -> None:
        state = self.state
        if not self._told and state.plan.outside:
            self._told = True
            _report_outside(state)
        warn_if_nothing_rewritten(state.report, [s for s in state.report.sites if s.training], stacklevel=4)


def _report_outside(state: Applied) -> None:
    """Attention the model's own code calls outside its layers: uncompiled, so dense; in the report and said."""
    outside = state.plan.outside
    calls = ", ".join(f"{op} x{count}" for op, count in Counter(s.op for s in outside).items())
    reason = ("called by the model's own code outside its layers, which runs uncompiled when layers are compiled "
              "on their own; apply with regional=False to compile the whole model")
    state.report.record([SiteReport(-1, s.position, s.path, s.op, None, None, False, reason, True) for s in outside])
    state.report.note("attention outside the layers",
                      f"lhcompile: {type(state.model).__name__}'s own code calls attention outside its layer stack "
                      f"({calls}); regional compilation compiles only the layers, so those calls run uncompiled and "
                      "dense. Apply with regional=False to compile the whole model, where the pass sees them too",
                      stacklevel=5)


class _LayerCall:
    """A layer's call: where its attention sites stand at this call (from the plan, by how often it was called in
    this model call), then its compiled graphs."""

    def __init__(self, state: Applied, module: torch.nn.Module, backends: dict[bool, Backend],
                 calls: dict[bool, _Calls], classes: int) -> None:
        self.state, self.module = state, module
        self.compiled = _Compiled(module, backends, calls, classes)
        self.body = _Compiled(module, backends, calls, classes, body=_forward_body)

    @torch.compiler.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state, module = self.state, self.module
        if torch.compiler.is_exporting():
            return module._call_impl(*args, **kwargs)
        if current_sites() is not None:  # called inside another layer: its sites are the other's
            return self._run(None, args, kwargs)
        plan = state.plan
        planned = plan.calls.get(module) or [()]
        positions = planned[state.counts[module] % len(planned)]
        state.counts[module] += 1
        return self._run(Sites(positions, plan.paths(positions), plan.total), args, kwargs)

    def _run(self, sites: Sites | None, args: tuple, kwargs: dict) -> Any:
        module = self.module
        original = _checkpointing(module)
        if original is None:
            return _run(module, self.compiled, sites, self.state, args, kwargs)

        # a layer that checkpoints itself (transformers' gradient checkpointing, with or without offloading its
        # saved activations to the host): its call runs as written, the checkpoint (and its saved-tensor hooks)
        # eagerly, and the compiled graph is the body it checkpoints, so that Dynamo neither meets the context
        # managers nor the side effects of the checkpointed code. The recompute in the backward runs the same body
        # at the same positions
        batch = current_batch()

        def checkpointed(function: functools.partial, *inputs: Any) -> Any:
            def body(*tensors: Any) -> Any:
                # the recompute in the backward runs outside the model's call: it enters the forward's batch, so that
                # its graph reads what the forward's did
                fresh = None if sites is None else Sites(sites.positions, sites.paths, sites.total)
                with entered(batch) if batch is not None and current_batch() is None else contextlib.nullcontext():
                    return _run(module, self.body, fresh, self.state, (function.func, *function.args, *tensors),
                                function.keywords)
            return original(body, *inputs)

        module.__dict__["_gradient_checkpointing_func"] = checkpointed
        try:
            return module._call_impl(*args, **kwargs)
        finally:
            module.__dict__["_gradient_checkpointing_func"] = original


def _forward_body(forward: Callable, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """What a checkpointing layer checkpoints: its forward (compiled inside the checkpoint, see ``_LayerCall``)."""
    return forward(module, *args, **kwargs)


def _checkpointing(module: torch.nn.Module) -> Callable | None:
    """The checkpoint function of a layer that checkpoints its own forward at this call (transformers'
    ``GradientCheckpointingLayer``: ``gradient_checkpointing`` set, training, gradients enabled), else None."""
    function = module.__dict__.get("_gradient_checkpointing_func") or getattr(module, "_gradient_checkpointing_func",
                                                                              None)
    if not (getattr(module, "gradient_checkpointing", False) is True and callable(function) and module.training
            and torch.is_grad_enabled() and _wraps_forward(module)):
        return None
    return function


def _wraps_forward(module: torch.nn.Module) -> bool:
    """Whether the module's forward is transformers' checkpointing wrapper around its own forward."""
    forward = type(module).forward
    return getattr(forward, "__name__", "") == "forward_with_checkpointing" or (
        getattr(forward, "__code__", None) is not None and forward.__code__.co_name == "forward_with_checkpointing")


def _run(module: torch.nn.Module, compiled: _Compiled, sites: Sites | None, state: Applied,
         args: tuple = (), kwargs: dict | None = None) -> Any:
    """Run a compiled call at ``sites``, and say what of it ran outside the compiled graphs, with the cause."""
    kwargs = kwargs or {}
    backend = compiled.backends[module.training]
    runs, breaks = backend.runs, _graph_breaks()
    with entered(sites) if sites is not None else contextlib.nullcontext():
        out = compiled(*args, **kwargs)
    if torch.compiler.is_exporting():
        return out
    eager = backend.runs == runs
    if eager or (sites is not None and sites.missed and module.training):
        new = _graph_breaks() - breaks  # the graph breaks Dynamo met in this call
        if eager:
            _warn_ran_eagerly(module, backend, _shapes(args, kwargs), compiled.new, new, compiled.classes)
        if sites is not None and sites.missed and module.training:
            _report_missed(state, sites, new, eager)
    return out


def _first_break(breaks: Counter) -> str | None:
    """Dynamo's first graph break in ``breaks`` (not its recompile limit), in a line: what and why."""
    reasons = [r for r in breaks if "recompile limit" not in r.lower()]
    if not reasons:
        return None
    lines = [line.strip() for line in reasons[0].splitlines() if line.strip()]
    why = next((line.removeprefix("Explanation:").strip() for line in lines if line.startswith("Explanation:")), "")
    return f"{lines[0]}: {why}" if why else lines[0]


def _report_missed(state: Applied, sites: Sites, breaks: Counter, eager: bool) -> None:
    """Attention of a call that no compiled graph ran: dense; in the report's rows and said once."""
    plan, cause = state.plan, _first_break(breaks)
    why = (f"Dynamo could not capture it ({cause})" if cause else
           "Dynamo ran the call eagerly (its recompile limit, or TORCHDYNAMO_DISABLE)" if eager else
           "it ran outside the compiled graphs")
    reason = f"ran outside lhcompile's compiled graphs, so dense: {why}"
    # a site a compiled graph has run keeps its row (that graph still serves the calls Dynamo can match to it)
    state.report.record([SiteReport(-1, p, plan.sites[p].path, plan.sites[p].op, None, None, False, reason, True)
                         for p in sites.missed if (True, -1, p) not in state.report.rows])
    if eager:
        return  # said by _warn_ran_eagerly
    first = plan.sites[sites.missed[0]]
    state.report.note(f"missed {cause}",
                      f"lhcompile: the attention at {first.path or '<top>'} (site {first.position} of {plan.total}"
                      f"{f' and {len(sites.missed) - 1} more' if len(sites.missed) > 1 else ''}) ran dense: {why}. "
                      "TORCH_LOGS=graph_breaks shows where", stacklevel=5)


def _shapes(args: tuple, kwargs: dict) -> tuple:
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x if isinstance(x, int) else type(x).__name__
                 for x in tree_leaves((args, kwargs)))


def _warn_ran_eagerly(module: torch.nn.Module, backend: Backend, shapes: tuple, new: bool, breaks: Counter,
                      classes: int) -> None:
    mode = "training" if backend.scope.training else "eval"
    cause = _first_break(breaks)
    if cause is not None:
        note = (f"lhcompile: {type(module).__name__}'s call in {mode} mode ran none of the graphs lhcompile compiled: "
                f"Dynamo could not capture it ({cause}), so it ran eagerly, with dense attention. TORCH_LOGS="
                "graph_breaks shows where")
    else:
        limit = torch._dynamo.config.recompile_limit * (classes if classes > 1 else 1)
        what = (f"with input shapes it had not seen ({', '.join(map(str, shapes[:3]))})" if new else
                "with input shapes it had seen, but something else Dynamo guards on changed (grad mode, e.g. a "
                "forward under torch.no_grad(); autocast; a module attribute)")
        note = (f"lhcompile: {type(module).__name__} was called in {mode} mode {what}, and none of the graphs "
                f"lhcompile compiled ran: Dynamo has reached its recompile limit (recompile_limit={limit}, as Dynamo "
                "counts it: graphs per code, every sequence length, mode and guard counted, lhcompile's layer calls "
                "sharing nn.Module's code), or it is disabled (TORCHDYNAMO_DISABLE), and runs the call eagerly, with "
                "dense attention. Use few distinct sequence lengths (pad or bucket them), keep grad and autocast "
                "modes alike across calls, or raise torch._dynamo.config.recompile_limit")
    backend.report.note(f"ran eagerly {mode} {cause}", note, stacklevel=6)


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
