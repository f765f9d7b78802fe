"""What the pass found and did at each attention site: the report that ``lhcompile.inspect`` returns."""

from __future__ import annotations

import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Iterator



REASON_WIDTH = 72
"""Characters per line of a reason in the report's table."""


class LighthouseWarning(UserWarning):
    """Something lhcompile did not do, or did on a guess (filter with warnings.filterwarnings)."""


@dataclass
class Once:
    """Says each kind of thing once: a ``LighthouseWarning`` the first time a key is said, nothing after."""

    said: set[str] = field(default_factory=set)

    def warn(self, key: str, message: str, stacklevel: int = 2) -> bool:
        """Warn with ``message`` unless ``key`` was said already; returns whether it warned."""
        if key in self.said:
            return False
        self.said.add(key)
        warnings.warn(message, LighthouseWarning, stacklevel=stacklevel + 1)
        return True


@dataclass(frozen=True)
class SiteReport:
    """One attention site of the model, and whether it runs Lighthouse (or every reason why not)."""

    graph: int
    """The graph that ran it last."""
    index: int
    """Its place among the model's attention sites in execution order (what ``dense_layers`` counts); within its
    graph, where the graph was seen without the model (``lhcompile.backend``, a GraphModule)."""
    module_path: str
    op: str
    """The call, e.g. 'F.scaled_dot_product_attention', 'flex_attention', 'varlen_attn'."""
    q_shape: tuple | None
    kv_heads: int | None
    rewritten: bool
    reason: str
    training: bool = True
    """Whether the graph was captured for training (a graph for eval mode rewrites nothing)."""
    documents: bool = False
    """Whether the call attends within packed documents (Lighthouse then runs per document)."""


@dataclass
class Report:
    """Every attention site lhcompile has seen in a model, and what it could not do elsewhere: one row per site
    and mode, as the latest graph to run it left it.

    It is a sequence of its ``SiteReport`` rows, in the model's order: ``for site in report``, ``len(report)``,
    ``report[0]``."""

    rows: dict[tuple, SiteReport] = field(default_factory=dict)
    """Each site's row, by its key (see ``record``)."""
    graphs: int = 0
    """Graphs captured."""
    compiled: int = 0
    """Graphs compiled: a captured graph compiles once per kind of place it runs at (Lighthouse, dense layer) and
    kind of batch (see ``variant_calls``) that it meets."""
    notes: list[str] = field(default_factory=list)
    """What was said about the model beyond its rows (also warned about)."""
    once: Once = field(default_factory=Once)
    """What was said about this model (each kind of warning once)."""
    state: str = "applied"
    """'applied', 'restored' (the model is dense again: the rows say what the pass did before) or 'not applied'."""
    variant_calls: dict[str, int] = field(default_factory=dict)
    """Calls of graphs whose Lighthouse sites all run per document that ran another graph for their batch, by
    ``lhcompile.document_probe``'s name for it: 'as captured' (no document of ``config.min_lighthouse_len`` tokens:
    dense within documents, the model's own kernel), 'dense' (the same, on ``document_attention`` where it is the
    faster), 'rows' (one document per row: plain Lighthouse)."""

    _variants: dict[str, tuple[str, str, bool]] = field(default_factory=dict, repr=False)
    """Per name of ``variant_calls``: what its batches held, what graph ran, and whether it is dense."""

    def count_variant(self, name: str, held: str, graph: str, dense: bool) -> None:
        """Count a graph call that ran the graph ``name`` for its batch, which held ``held``."""
        self._variants[name] = (held, graph, dense)
        self.variant_calls[name] = self.variant_calls.get(name, 0) + 1

    def record(self, rows: list[SiteReport], per_graph: bool = False) -> None:
        """Keep ``rows``, each replacing the row of its site: a site is its position among the model's sites and
        its mode, or with ``per_graph`` (positions counted within each graph, as ``lhcompile.backend`` sees them
        where it cannot see the model) also its graph."""
        for row in rows:
            self.rows[(row.training, row.graph if per_graph else -1, row.index)] = row

    def note(self, key: str, message: str, stacklevel: int = 2) -> bool:
        """Warn with ``message`` once per ``key`` and keep it among the notes; returns whether it warned."""
        said = self.once.warn(key, message, stacklevel + 1)
        if said:
            self.notes.append(message)
        return said

    @property
    def sites(self) -> list[SiteReport]:
        """The rows in the model's order: by mode (in the order the modes were first seen), then position."""
        modes: dict[bool, int] = {}
        for training, _, _ in self.rows:
            modes.setdefault(training, len(modes))
        return [self.rows[key] for key in sorted(self.rows, key=lambda k: (modes[k[0]], k[1], k[2]))]

    @property
    def dense_batches(self) -> int:
        """Graph calls whose batch held no document long enough for Lighthouse (dense within documents)."""
        return sum(self.variant_calls.get(name, 0) for name, (_, _, dense) in self._variants.items() if dense)

    def __iter__(self) -> Iterator[SiteReport]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> SiteReport:
        return self.sites[i]

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def dense(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.rewritten]

    def table(self, sites: list[SiteReport] | None = None, reason_width: int = REASON_WIDTH) -> str:
        """The rows as a table; reasons are wrapped at ``reason_width`` characters, so a row stays readable in a
        terminal."""
        rows = [("graph", "#", "module", "op", "q shape", "kv heads", "lighthouse", "reason")]
        for s in self.sites if sites is None else sites:
            shape = "x".join(map(str, s.q_shape)) if s.q_shape else "?"
            rows.append(
                (str(s.graph), str(s.index), s.module_path or "<top>", s.op, shape, str(s.kv_heads or "?"),
                 "yes" if s.rewritten else "no", s.reason)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        indent = " " * (sum(widths) + 2 * len(widths))
        lines = []
        for r in rows:
            reason = textwrap.wrap(r[-1], reason_width, break_on_hyphens=False) or [""]
            lines.append("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), reason[0]]).rstrip())
            lines += [indent + more for more in reason[1:]]
        lines.insert(1, "  ".join("-" * w for w in (*widths, min(reason_width, max(len(r[-1]) for r in rows)))))
        return "\n".join(lines)

    def __str__(self) -> str:
        head = {"restored": "lhcompile: restored, the model runs its dense attention again; before restore:\n",
                "applied": ""}.get(self.state, "")
        if self.state == "not applied":
            return "lhcompile: not applied to this model (lhcompile.apply rewrites it; see also a callback's report)"
        if not self.sites and not self.notes:
            if self.graphs:
                return (f"{head}lhcompile: the {self.graphs} graph(s) captured from this model call no attention that "
                        "lhcompile rewrites (scaled_dot_product_attention, varlen_attn, FlexAttention, "
                        "lhcompile.document_attention)")
            return f"{head}lhcompile: no attention site seen yet (a module is captured on its first forward call)"
        with_sites = sorted({s.graph for s in self.sites})
        summary = (f"{head}lhcompile: {len(self.rewritten)} of {len(self.sites)} attention sites rewritten, in graph"
                   f"{'s' if len(with_sites) > 1 else ''} {', '.join(map(str, with_sites))} ({self.graphs} captured)")
        summary += "".join(f"; {count} graph call(s) found {self._variants[name][0]} in their batch and ran the graph "
                           f"{self._variants[name][1]}" for name, count in self.variant_calls.items())
        return "\n".join([summary, *(self.table().splitlines() if self.sites else []), *self.notes])
