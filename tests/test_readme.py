"""README's quick start runs as written (so it cannot go stale), and its CI lines are where CI reads them."""

from __future__ import annotations

import re
from pathlib import Path

import lhcompile

README = (Path(__file__).parents[1] / "README.md").read_text()


def _block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_quick_start_rewrites_the_middle_blocks_and_restores_them(capsys):
    scope: dict = {}
    exec(compile(_block_after("## Quick start"), "README quick start", "exec"), scope)
    printed = capsys.readouterr().out
    assert "2 of 4 attention sites rewritten" in printed, printed
    report = lhcompile.inspect(scope["model"])
    assert report.state == "restored" and [s.index for s in report.rewritten] == [1, 2]
    assert scope["config"].min_lighthouse_len == 128 <= scope["x"].shape[1]


def test_the_ci_lines_are_tagged_and_the_main_job_comes_between_them():
    lines = README.splitlines()
    assert lines[3].endswith("# ci:install") and lines[5].endswith("# ci:test")
    assert lines[4].startswith("python examples/train.py")
