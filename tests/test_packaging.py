"""How lhcompile installs."""

from __future__ import annotations

import subprocess
import sys





def test_passes_install_inside_lhcompile_not_as_a_top_level_package(tmp_path):
    code = ("import importlib.util, lhcompile.passes; "
            "print(importlib.util.find_spec('passes') is None, lhcompile.passes.find_sites.__module__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.stdout.split() == ["True", "lhcompile.passes.kinds"], run.stderr

