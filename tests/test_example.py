"""The README's main job and the quality check run end to end at tiny size; the data and the probe mean what
they say; the checkpoint loads into plain transformers."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

EXAMPLES = Path(__file__).parents[1] / "examples"
TINY = ["--size", "tiny", "--steps", "6", "--eval-every", "3", "--eval-batches", "1", "--probe-batches", "1",
        "--seq-len", "256", "--batch", "2"]


def _example(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # the examples import each other by name
    return importlib.import_module(name)


def test_two_stage_training_switches_at_the_recovery_share_and_checkpoint_reloads(tmp_path):
    train = _example("train")
    result = train.main([*TINY, "--recovery", "0.5", "--out", str(tmp_path)])
    assert len(result["train"]) == 6 and all(torch.isfinite(torch.tensor(l)) for _, l in result["train"])
    assert [p["step"] for p in result["heldout"]] == [0, 3, 6]
    assert result["lighthouse_steps"] == 3 and result["lighthouse_sites"] == 2, result["report"]
    switch = result["heldout"][1]
    assert set(switch["buckets"]) == {"0-8", "8-32", "32-128", "128-256"}
    assert switch["lighthouse_loss"] != switch["loss"]  # Lighthouse and dense attention differ on held-out data
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["final_heldout_loss"] == result["final_heldout_loss"]
    model = result["model"].eval()
    plain = LlamaForCausalLM.from_pretrained(result["checkpoint"]).eval()
    trained, loaded = model.state_dict(), plain.state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    ids = torch.randint(0, 259, (1, 64))
    with torch.no_grad():  # the CPU default runs eagerly: same code, same weights, same bits
        assert torch.equal(plain(ids).logits, model(ids).logits)


def test_dense_baseline_sees_the_same_batches_and_is_evaluated_at_the_switch(tmp_path):
    train = _example("train")
    two_stage = train.main([*TINY, "--recovery", "0.5", "--no-save", "--out", str(tmp_path / "lh")])
    dense = train.main([*TINY, "--recovery", "0.5", "--dense", "--no-save", "--out", str(tmp_path / "dense")])
    assert [p["step"] for p in dense["heldout"]] == [p["step"] for p in two_stage["heldout"]]
    assert dense["lighthouse_steps"] == 0 and "lighthouse_loss" not in dense["heldout"][1]
    # same initial weights, same first batches: the losses agree while both runs are dense or before updates
    assert dense["heldout"][0]["loss"] == two_stage["heldout"][0]["loss"]
    assert dense["tokens"] == two_stage["tokens"] == 6 * 2 * 256
    assert not (tmp_path / "dense" / "checkpoint").exists()


def test_probe_inserts_key_lines_and_queries_whose_answers_are_where_it_says():
    corpus = _example("corpus")
    gen = torch.Generator().manual_seed(0)
    text = corpus.python_corpus().heldout[:4000]
    probe = corpus.Probe(keys=5, queries=3, tail=256)
    probed, answers = corpus.probed(text, probe, gen)
    assert probed.numel() == text.numel() + probe.bytes
    source = bytes(probed.tolist()).decode("latin-1")
    keys = dict(re.findall(r"(?m)^([a-z]{5}) = (\d{5})$", source))
    assert len(keys) >= 5
    lines = [m for m in re.finditer(r"(?m)^assert ([a-z]{5}) == (\d{5})$", source)]
    assert len(lines) == 3 and all(keys[m.group(1)] == m.group(2) for m in lines)
    assert all(m.start() >= probed.numel() - probe.tail for m in lines), "queries must sit in the tail"
    for at, distance, m in zip(answers.digit_at.tolist(), answers.distance.tolist(), lines):
        assert bytes(probed[at : at + 5].tolist()).decode() == m.group(2)
        key_line = ("\n" + source).rindex(f"\n{m.group(1)} = ", 0, m.start() + 1)  # its line start
        assert distance == m.start() - key_line


class Retriever(torch.nn.Module):
    """A perfect retriever: at every position that precedes an answer digit it puts all weight on that digit,
    read from the key line (``shift`` reads the wrong digit, to show the scoring can fail)."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, 259)
        for row, ids in enumerate(input_ids):
            source = bytes(ids.tolist()).decode("latin-1")
            keys = dict(re.findall(r"([a-z]{5}) = (\d{5})\n", source))  # lines go mid-line where no line starts
            for m in re.finditer(r"assert ([a-z]{5}) == ", source):
                for j, digit in enumerate(keys[m.group(1)]):
                    if m.end() + j - 1 < ids.numel():
                        logits[row, m.end() + j - 1, ord("0") + (int(digit) + self.shift) % 10] = 1.0
        return type("Out", (), {"logits": logits})()


def test_probe_scores_a_perfect_retriever_right_and_a_wrong_one_wrong():
    train = _example("train")
    args = train.parse([*TINY, "--probe-batches", "3"])
    corpus = _example("corpus")
    evaluator = train.Evaluator(corpus.python_corpus().heldout, train.SIZES["tiny"], args, torch.device("cpu"),
                                train.contextlib.nullcontext)
    right, wrong = evaluator.probe(Retriever()), evaluator.probe(Retriever(shift=3))
    assert right["per_digit"] == right["exact"] == 1.0 and right["queries"] == 3 * 2
    assert wrong["per_digit"] == wrong["exact"] == 0.0
    assert sum(b["queries"] for b in right["by_distance"].values()) == right["queries"]


def test_corpus_is_deduplicated_python_source_with_every_20th_file_held_out():
    corpus = _example("corpus").python_corpus()
    assert corpus.train.dtype == torch.uint8 and corpus.train.numel() > 10 * corpus.heldout.numel() > 0
    assert corpus.files > 1000 and corpus.duplicates > 0
    assert b"def " in bytes(corpus.train[:200000].tolist())


def test_quality_check_smoke_runs_the_pair_and_judges_every_criterion(tmp_path):
    quality = _example("quality_check")
    summary = quality.main(["--smoke", "--out", str(tmp_path)])
    assert set(summary["verdict"]) == {*quality.CRITERIA, "beats_dense"}
    assert all(summary["verdict"][k]["status"] in ("pass", "fail", "invalid") for k in quality.CRITERIA)
    dense, two = summary["dense"], summary["two_stage"]
    assert dense["tokens"] == two["tokens"] and [p["step"] for p in dense["heldout"]] == [p["step"] for p in two["heldout"]]
    assert two["lighthouse_steps"] in [p["step"] for p in two["heldout"]]
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert json.loads((tmp_path / "quality.json").read_text())["verdict"] == summary["verdict"]


@pytest.mark.parametrize("gap,status", [(0.005, "pass"), (0.02, "fail")])
def test_final_loss_criterion_is_one_percent(gap, status):
    quality = _example("quality_check")
    run = lambda loss, lighthouse: {  # noqa: E731
        "final_heldout_loss": loss, "final_buckets": {"16K-32K": loss}, "probe": {"per_digit": 0.6},
        "lighthouse_steps": lighthouse, "heldout": [{"step": 100, "loss": loss}, {"step": 200, "loss": loss}],
        "train_s": 100.0 if lighthouse else 200.0, "compile_s": 1.0}
    verdict = quality.verdict(run(1.0, 0), run(1.0 + gap, 100))
    assert verdict["final_loss"]["status"] == verdict["long_bucket"]["status"] == status
    assert verdict["recovery"]["status"] == status and verdict["wall_clock"]["status"] == "pass"


def test_context_parallel_launcher_trains_on_two_cpu_processes():
    import subprocess

    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "examples/train_cp.py",
         "--steps", "2", "--warmup", "1", "--seq-len", "512"],
        cwd=EXAMPLES.parent, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in run.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and losses[-1] < losses[0], run.stdout
    # per-layer fully_shard (the default wrap): every layer decided on its own, the outer two kept dense
    assert "2 of 4 SDPA sites rewritten" in run.stdout and "model.layers.1.self_attn" in run.stdout, run.stdout
    assert "CP=2, N=512:" in run.stdout
