"""Debug mode: the site table on stderr and each captured graph's code before and after the rewrite on disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..report import Report

DEBUG_ENV = "LHCOMPILE_DEBUG"
DEBUG_DIR_ENV = "LHCOMPILE_DEBUG_DIR"


def debug_enabled(flag: bool | None) -> bool:
    """An explicit flag wins; otherwise LHCOMPILE_DEBUG=1 turns debug mode on."""
    return flag if flag is not None else os.environ.get(DEBUG_ENV, "") not in ("", "0")


def debug_dir() -> Path:
    return Path(os.environ.get(DEBUG_DIR_ENV, "lhcompile_debug"))


def dump_graph(graph: int, before: str, after: str, lighthouse: bool = True) -> Path:
    """Write readable graph code as captured (``graph{N}_before.py``) and rewritten; returns the file of the latter.
    A graph that serves several layers is rewritten once per kind of place it runs at: the version with Lighthouse
    sites is ``graph{N}_after.py``, one whose sites all stay dense ``graph{N}_after_dense.py``."""
    out = debug_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"graph{graph}_after{'' if lighthouse else '_dense'}.py"
    (out / f"graph{graph}_before.py").write_text(before)
    path.write_text(after)
    print(f"lhcompile: graph code written to {out}/graph{graph}_before.py and {path.name}", file=sys.stderr)
    return path


def dump_report(report: Report) -> Path:
    """Write the site table to ``sites.txt`` and stderr (each time sites were added or changed)."""
    out = debug_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "sites.txt").write_text(str(report) + "\n")
    print(report, file=sys.stderr)
    return out / "sites.txt"
