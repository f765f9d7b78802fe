"""Inspection: what the pass found and did at each SDPA site, as data, as a table, and as graph code on disk."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEBUG_ENV = "LHCOMPILE_DEBUG"
DEBUG_DIR_ENV = "LHCOMPILE_DEBUG_DIR"


def debug_enabled(flag: bool | None) -> bool:
    """An explicit flag wins; otherwise LHCOMPILE_DEBUG=1 turns debug mode on."""
    return flag if flag is not None else os.environ.get(DEBUG_ENV, "") not in ("", "0")


def debug_dir() -> Path:
    return Path(os.environ.get(DEBUG_DIR_ENV, "lhcompile_debug"))


@dataclass(frozen=True)
class SiteReport:
    """One SDPA call found in a captured graph, and whether it was rewritten (or why not)."""

    graph: int
    index: int
    module_path: str
    target: str
    q_shape: tuple | None
    kv_heads: int | None
    rewritten: bool
    reason: str


@dataclass
class Report:
    """Every SDPA site lhcompile has seen in a model, graph by graph."""

    sites: list[SiteReport] = field(default_factory=list)
    graphs: int = 0

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def dense(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.rewritten]

    def __str__(self) -> str:
        if not self.sites:
            return "lhcompile: no SDPA site seen yet (a module is captured on its first forward call)"
        rows = [("graph", "#", "module", "op", "q shape", "kv heads", "lighthouse", "reason")]
        for s in self.sites:
            shape = "x".join(map(str, s.q_shape)) if s.q_shape else "?"
            rows.append(
                (str(s.graph), str(s.index), s.module_path or "<top>", s.target, shape, str(s.kv_heads or "?"),
                 "yes" if s.rewritten else "no", s.reason)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = f"lhcompile: {len(self.rewritten)} of {len(self.sites)} SDPA sites rewritten in {self.graphs} graph(s)"
        return "\n".join([summary, *lines])


def dump_graph(graph: int, before: str, after: str, report: Report) -> Path:
    """Write readable before/after graph code and the site table; returns the directory."""
    out = debug_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"graph{graph}_before.py").write_text(before)
    (out / f"graph{graph}_after.py").write_text(after)
    (out / "sites.txt").write_text(str(report) + "\n")
    print(f"{report}\nlhcompile: graph code written to {out}/graph{graph}_{{before,after}}.py", file=sys.stderr)
    return out
