"""Where the graphs that run inside one call of an applied model stand: the batch, and the attention sites.

Dynamo hands a compiled graph only its tensors, so the graph cannot tell which of the model's attention sites it
runs (a layer's graph serves every layer of its class, a graph's code may serve several layers after a graph break)
or which batch it is part of. The applied model's call and each of its layers' calls say it here, on a thread-local
stack, before they run their graphs:

- ``Batch``: one call of the model (one batch), with what the graphs found out about the batch once for all of its
  layers (its documents, whether a mask is causal): nothing found in one model call is trusted in another, so a
  batch written in place into the tensors of the last one (a reused buffer filled by ``dist.broadcast``, a write
  through ``numpy()`` or ``untyped_storage()``) is read anew;
- ``Sites``: one call of a layer (or of the whole model), with the positions of its attention calls among the
  model's sites in execution order (what ``dense_layers`` counts) and their module paths; each graph that runs
  inside takes the next positions in order.

Thread-local, and module-level for that reason: a graph runs on the thread of the call that runs it, and nothing but
this stack connects the two.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass
class Batch:
    """One call of an applied model: what its graphs found out about the batch, by the question asked."""

    found: dict[Any, Any] = field(default_factory=dict)


@dataclass
class Sites:
    """The attention sites of one call of a layer (or of the whole model compiled as one) in the model's order."""

    positions: tuple[int, ...]
    """Each attention call's place among the model's sites in execution order."""
    paths: tuple[str, ...]
    """Each attention call's module path in the model."""
    total: int
    """The model's attention sites per call."""
    taken: int = 0
    """How many of them graphs have run so far in this call."""

    def take(self, count: int) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
        """The positions and paths of the next ``count`` sites, or None where fewer are left (the graph is not the
        one this call planned)."""
        if self.taken + count > len(self.positions):
            return None
        start, self.taken = self.taken, self.taken + count
        return self.positions[start : self.taken], self.paths[start : self.taken]

    @property
    def missed(self) -> tuple[int, ...]:
        """The positions no graph took: attention that ran outside the compiled graphs."""
        return self.positions[self.taken :]


_LOCAL = threading.local()
"""The model calls under way on this thread (``_stack``). Thread-local, not passed down: the model's own code calls
its compiled layers, so nothing of lhcompile's sits between a model call and its layers' calls to carry it."""


def _stack() -> list:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


@contextlib.contextmanager
def entered(what: Batch | Sites) -> Iterator[Batch | Sites]:
    """Make ``what`` the current batch or sites for the graphs that run inside."""
    stack = _stack()
    stack.append(what)
    try:
        yield what
    finally:
        stack.pop()


def current_sites() -> Sites | None:
    """The innermost call's sites, or None outside an applied model's call."""
    return next((s for s in reversed(_stack()) if isinstance(s, Sites)), None)


def current_batch() -> Batch | None:
    """The current model call's batch, or None outside an applied model's call."""
    return next((b for b in reversed(_stack()) if isinstance(b, Batch)), None)
