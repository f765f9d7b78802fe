"""Debug mode: the site table on stderr and each captured graph's code before and after the rewrite on disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .report import Report

DEBUG_ENV = "LHCOMPILE_DEBUG"
DEBUG_DIR_ENV = "LHCOMPILE_DEBUG_DIR"


def debug_enabled(flag: bool | None) -> bool:
    """An explicit flag wins; otherwise LHCOMPILE_DEBUG=1 turns debug mode on."""
    return flag if flag is not None else os.environ.get(DEBUG_ENV, "") not in ("", "0")


def debug_dir() -> Path:
    return Path(os.environ.get(DEBUG_DIR_ENV, "lhcompile_debug"))


def dump_graph(graph: int, before: str, after: str, report: Report) -> Path:
    """Write readable before/after graph code and the site table; returns the directory."""
    out = debug_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"graph{graph}_before.py").write_text(before)
    (out / f"graph{graph}_after.py").write_text(after)
    (out / "sites.txt").write_text(str(report) + "\n")
    print(f"{report}\nlhcompile: graph code written to {out}/graph{graph}_{{before,after}}.py", file=sys.stderr)
    return out
