import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh():
    # each test compiles new model instances: without a reset, Dynamo's per-code-object recompile limit
    # would make later tests fall back to eager (and so to dense attention)
    torch._dynamo.reset()
    torch.manual_seed(0)
