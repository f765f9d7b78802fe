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
