"""DistributedDataParallel splits each captured graph into one graph per gradient bucket (Dynamo's DDPOptimizer):
dense_layers still counts the sites of the whole model, and the result is the single-device one."""

from __future__ import annotations

import copy
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel

import lhcompile
from lhcompile import LighthouseWarning
from tests.distributed import spawn
from tests.models import GPT, VOCAB
from tests.steps import CFG, N, assert_same_training_step


def _ddp(rank):
    torch.manual_seed(0)
    model = GPT(dim=512, layers=8)  # 12.6 MB of parameters per layer: DDP's default 25 MB buckets hold two
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LighthouseWarning)  # no "nothing rewritten" from a bucket of dense sites
        lhcompile.apply(model, CFG, compiler="eager", regional=False)  # by layer, DDP splits each layer's graph
        ddp = DistributedDataParallel(model)  # default bucket sizes
        ids = torch.randint(0, VOCAB, (1, N))  # the same on both ranks: averaged gradients equal one rank's
        assert_same_training_step(ddp, twin, ids, set(range(1, 7)), tol=1e-5)
    report = lhcompile.inspect(model)
    assert len({s.graph for s in report}) > 2, f"DDP did not split the graph into buckets:\n{report}"
    assert [s.index for s in report] == list(range(8))
    assert [s.rewritten for s in report] == [False] + [True] * 6 + [False], str(report)
    assert report[7].reason == "dense layer (site 7 of 8 is in dense_layers=(0, -1))"


def test_ddp_buckets_count_dense_layers_across_the_whole_model(tmp_path):
    spawn(_ddp, tmp_path)
