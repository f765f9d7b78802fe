"""``lhcompile.selections``: what each Lighthouse site gathers, as its Lighthouse stage runs it."""

from __future__ import annotations

import copy

import pytest
import torch

import lhcompile
from lhcompile import LighthouseConfig
from lhcompile.operator import reference as R

from . import naive
from .models import GPT, VOCAB, logits
from .steps import CFG, N


@pytest.mark.parametrize("scorer", ["norm", "dilated"])
def test_each_site_records_the_entries_its_selection_gathers_and_runs_as_in_training(scorer, tmp_path):
    torch.manual_seed(0)
    config = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_budget=4, dense_layers=(0, -1), scorer=scorer,
                              dilation=2)
    model = GPT()
    applied = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, N))
    found = lhcompile.selections(model, ids, config=config)
    assert found.calls == 4 and [s.site for s in found.sites] == [1, 2]
    # the forward is the Lighthouse stage's: the applied model's logits
    lhcompile.apply(applied, config, compiler="eager")
    torch.testing.assert_close(found.output, logits(applied, ids), rtol=1e-6, atol=1e-6)
    # what is covered is what the selection emits, level by level (checked on site 1's own q and k)
    block = model.blocks[1]
    x = model.wte(ids) + model.wpe(torch.arange(N))
    x = model.blocks[0](x)
    b, n, c = x.shape
    q, k, v = block.qkv(block.ln1(x)).view(b, n, 3, block.heads, c // block.heads).permute(2, 0, 3, 1, 4)
    s_qk, s_kq = (naive.dilated_scores(q, k, v, 2, 2, 2) if scorer == "dilated" else R.score(q, k, 2, 2))
    for row, entries in enumerate(naive.select(s_qk, s_kq, N, 2, 2, 8, 4)):
        for head, emitted in enumerate(entries):
            for lvl in range(2):
                want = torch.zeros(N, dtype=torch.bool)
                for level, i in emitted:
                    if level == lvl:
                        want[i * 2**lvl : (i + 1) * 2**lvl] = True
                assert torch.equal(found.sites[0].covered[lvl, row, head], want)
    assert found.sites[0].covered[1].all()  # every coarsest entry is gathered
    fraction = found.fraction_covering(5)
    assert fraction == float(torch.cat([s.covered[0, 0, :, 5] for s in found.sites]).float().mean())
    found.plot(str(tmp_path / "site1.png"), site=1, mark=5)
    assert (tmp_path / "site1.png").stat().st_size > 1000
    assert found.dense == {0: "dense layer (site 0 of 4 is in dense_layers=(0, -1))",
                           3: "dense layer (site 3 of 4 is in dense_layers=(0, -1))"}
    with pytest.raises(ValueError, match=r"site 0 ran no Lighthouse \(dense layer \(site 0 of 4 .*\)\); its "
                                         r"Lighthouse sites are \[1, 2\]"):
        found.plot(str(tmp_path / "site0.png"), site=0)


def test_an_applied_model_runs_its_own_code_and_short_inputs_select_nothing():
    torch.manual_seed(0)
    model = GPT()
    lhcompile.apply(model, CFG, compiler="eager")
    found = lhcompile.selections(model, torch.randint(0, VOCAB, (1, N)), config=CFG, sites=[2])
    assert [s.site for s in found.sites] == [2]
    short = lhcompile.selections(model, torch.randint(0, VOCAB, (1, 8)), config=CFG)
    assert short.sites == [] and short.dense[1] == "sequence too short: N=8 < min_lighthouse_len=16"


def test_a_forward_without_sdpa_says_there_is_nothing_to_show():
    with pytest.warns(lhcompile.LighthouseWarning, match="made no F.scaled_dot_product_attention call"):
        found = lhcompile.selections(torch.nn.Linear(4, 4), torch.randn(2, 4), config=CFG)
    assert found.calls == 0 and found.sites == []
