import os

import pytest
import torch

if not torch.cuda.is_available():
    # run the Triton kernels on CPU tensors (tests/test_kernels.py); must be set before triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh():
    # each test compiles new model instances: without a reset, Dynamo's per-code-object recompile limit
    # would make later tests fall back to eager (and so to dense attention)
    torch._dynamo.reset()
    torch.manual_seed(0)


class Recorder(list):
    """A torch.compile backend (a compiler for ``lhcompile.apply``) that keeps every graph it is handed, in order,
    and runs it as it is."""

    def __call__(self, gm, example_inputs):
        self.append(gm)
        return gm.forward


@pytest.fixture
def recorded() -> Recorder:
    """The graphs a compiler was handed: pass it as ``compiler=`` (or ``backend=``), read it as a list."""
    return Recorder()
