"""benchmarks.bench parses its arguments on any machine (it times only on a GPU)."""

from __future__ import annotations

import pytest

from benchmarks import bench
from lhcompile.operator.documents import PLANNER


@pytest.mark.parametrize("argv", [["--documents"], ["--documents", "--cudnn-min-length", "none"],
                                  ["--cudnn-min-length", "4096"], ["--documents", "--mixes", "16 x 8K", "128 x 1K"]])
def test_every_documented_form_of_its_arguments_parses_and_it_says_it_needs_a_gpu(argv, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    default = PLANNER.cudnn_min_length
    with pytest.raises(SystemExit, match="times CUDA kernels; no CUDA device is visible"):
        bench.main(argv)
    assert PLANNER.cudnn_min_length == default  # set only once it times


def test_a_mix_it_does_not_know_is_refused_with_the_ones_it_knows(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--documents", "--mixes", "3 x 1K"])
    err = capsys.readouterr().err
    assert "invalid choice: '3 x 1K'" in err and "'128 x 1K'" in err
