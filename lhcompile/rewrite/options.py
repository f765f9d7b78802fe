"""Everything ``apply`` and ``backend`` are told, validated once into one frozen object."""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from ..config import LighthouseConfig
from .debug import debug_enabled
from ..report import LighthouseWarning
from .placements import ContextParallel, Placement, SingleDevice

FilterFn = Callable[[str], bool]
"""Called with an attention site's module path (e.g. 'model.layers.3.self_attn'); False keeps the site dense."""
Compiler = Literal["inductor", "eager"] | str | Callable[[fx.GraphModule, Sequence[Any]], Callable]
"""What compiles a graph after the rewrite: 'inductor', 'eager' (run it op by op), the name of any other
registered torch.compile backend, or a backend callable."""


@dataclass(frozen=True)
class Options:
    config: LighthouseConfig
    filter_fn: FilterFn | None
    compiler: Compiler
    debug: bool
    placement: Placement
    """Where the rewritten attention runs: one device, or a context-parallel group."""
    regional: bool = True
    """``apply`` compiles each layer of a layer stack on its own (one compile per kind of layer), not the whole
    model."""

    @classmethod
    def make(cls, config: LighthouseConfig | None = None, *, filter_fn: FilterFn | None = None,
             compiler: Compiler = "inductor", debug: bool | None = None,
             context_parallel: dist.ProcessGroup | None = None, regional: bool = True,
             caller: str = "lhcompile.apply") -> Options:
        """Check every argument now, naming it and what is accepted, rather than at the first forward call."""
        config = LighthouseConfig() if config is None else config
        if not isinstance(config, LighthouseConfig):
            raise TypeError(
                f"{caller}: config must be a lhcompile.LighthouseConfig, got {type(config).__name__} {config!r}; "
                "build one with LighthouseConfig(**fields)"
            )
        if filter_fn is not None and not callable(filter_fn):
            raise TypeError(f"{caller}: filter_fn must be a callable (module path -> bool) or None, got {filter_fn!r}")
        if isinstance(compiler, str):
            backends = sorted(torch._dynamo.list_backends(exclude_tags=()))
            if compiler not in backends:
                raise ValueError(f"{caller}: compiler={compiler!r} is not a torch.compile backend; use one of "
                                 f"{', '.join(backends)}, or a backend callable")
        elif not callable(compiler):
            raise TypeError(f"{caller}: compiler must be a backend name or a callable (gm, example_inputs) -> "
                            f"callable, got {type(compiler).__name__}")
        if config.inner_attention == "flash_attn":
            try:
                importlib.import_module("flash_attn")
            except ImportError as err:
                raise ValueError(f"{caller}: LighthouseConfig(inner_attention='flash_attn') but the flash_attn package "
                                 "cannot be imported here; install flash-attn, or use inner_attention='sdpa' (PyTorch "
                                 "SDPA)") from err
        if context_parallel is None and dist.is_available() and not dist.is_initialized() \
                and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            warnings.warn(f"{caller}: context_parallel is None in a process of a {os.environ['WORLD_SIZE']}-process "
                          "launch before torch.distributed is initialized (dist.group.WORLD is None until then), so "
                          "the model runs single-device Lighthouse; call dist.init_process_group first if you meant "
                          "context parallelism", LighthouseWarning, stacklevel=3)
        placement = SingleDevice() if context_parallel is None else ContextParallel.make(context_parallel, config)
        if not isinstance(regional, bool):
            raise TypeError(f"{caller}: regional must be True (compile each layer of the layer stack on its own) or "
                            f"False (compile the whole model as one graph), got {regional!r}")
        return cls(config, filter_fn, compiler, debug_enabled(debug), placement, regional)

    def compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        """Hand a rewritten graph to the compiler."""
        if isinstance(self.compiler, str):
            return torch._dynamo.lookup_backend(self.compiler)(gm, example_inputs)
        return self.compiler(gm, example_inputs)
