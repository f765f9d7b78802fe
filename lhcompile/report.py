"""What the pass found and did at each SDPA site: the report that ``lhcompile.inspect`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator


class LighthouseWarning(UserWarning):
    """Something lhcompile did not do, or did on a guess (filter with warnings.filterwarnings)."""


@dataclass(frozen=True)
class SiteReport:
    """One SDPA call found in a captured graph, and whether it was rewritten (or every reason why not)."""

    graph: int
    index: int
    module_path: str
    target: str
    q_shape: tuple | None
    kv_heads: int | None
    rewritten: bool
    reason: str
    training: bool = True
    """Whether the graph was captured for training (a graph for eval mode rewrites nothing)."""


@dataclass
class Report:
    """Every SDPA site lhcompile has seen in a model, graph by graph, and what it could not do elsewhere.

    It is a sequence of its ``SiteReport`` rows: ``for site in report``, ``len(report)``, ``report[0]``."""

    sites: list[SiteReport] = field(default_factory=list)
    graphs: int = 0
    notes: list[str] = field(default_factory=list)
    """Graphs in which the pass found nothing to rewrite, and why (also warned about)."""
    warned: set[str] = field(default_factory=set)
    """Kinds of warning already given for this model (each is given once)."""

    def __iter__(self) -> Iterator[SiteReport]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, i: int) -> SiteReport:
        return self.sites[i]

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def dense(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.rewritten]

    def table(self, sites: list[SiteReport] | None = None) -> str:
        rows = [("graph", "#", "module", "op", "q shape", "kv heads", "lighthouse", "reason")]
        for s in self.sites if sites is None else sites:
            shape = "x".join(map(str, s.q_shape)) if s.q_shape else "?"
            rows.append(
                (str(s.graph), str(s.index), s.module_path or "<top>", s.target, shape, str(s.kv_heads or "?"),
                 "yes" if s.rewritten else "no", s.reason)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        if not self.sites and not self.notes:
            if self.graphs:
                return (f"lhcompile: the {self.graphs} graph(s) captured from this model call no SDPA: nothing to "
                        "rewrite (its attention, if any, is not torch.nn.functional.scaled_dot_product_attention)")
            return "lhcompile: no SDPA site seen yet (a module is captured on its first forward call)"
        summary = f"lhcompile: {len(self.rewritten)} of {len(self.sites)} SDPA sites rewritten in {self.graphs} graph(s)"
        return "\n".join([summary, *(self.table().splitlines() if self.sites else []), *self.notes])
