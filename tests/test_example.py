"""The README's main job and the quality study run end to end at tiny size; resumed and branched runs equal runs
straight through; the data and the retrieval measure mean what they say; the checkpoint loads into plain
transformers."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

EXAMPLES = Path(__file__).parents[1] / "examples"
TINY = ["--size", "tiny", "--steps", "6", "--eval-every", "3", "--eval-batches", "1", "--seq-len", "256",
        "--batch", "2", "--warmup", "2"]


def _example(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # the examples import each other by name
    return importlib.import_module(name)


def test_two_stage_training_switches_at_the_recovery_share_and_checkpoint_reloads(tmp_path):
    train = _example("train")
    result = train.main([*TINY, "--recovery", "0.5", "--save", "--out", str(tmp_path)])
    assert len(result["train"]) == 6 and all(torch.isfinite(torch.tensor(l)) for _, l in result["train"])
    assert [p["step"] for p in result["heldout"]] == [0, 3, 6]
    assert result["lighthouse_steps"] == 3 and result["lighthouse_sites"] == 2, result["report"]
    assert [p["lighthouse_steps"] for p in result["heldout"]] == [0, 3, 3]
    switch = result["heldout"][1]
    assert set(switch["buckets"]) == set(switch["copy"]) == {"0-8", "8-32", "32-128", "128-256"}
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["final_heldout_loss"] == result["final_heldout_loss"]
    model = result["model"].eval()
    plain = LlamaForCausalLM.from_pretrained(result["checkpoint"]).eval()
    trained, loaded = model.state_dict(), plain.state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    ids = torch.randint(0, 259, (1, 64))
    with torch.no_grad():  # the CPU default runs eagerly: same code, same weights, same bits
        assert torch.equal(plain(ids).logits, model(ids).logits)


def _same_run(a: dict, b: dict) -> None:
    wa, wb = a["model"].state_dict(), b["model"].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    assert a["train"] == b["train"]
    # b may hold one more evaluation, at the step where its first part stopped and saved
    strip = lambda points: {p["step"]: {k: v for k, v in p.items() if k != "train_s"} for p in points}  # noqa: E731
    held_a, held_b = strip(a["heldout"]), strip(b["heldout"])
    assert held_a == {step: held_b[step] for step in held_a}
    assert a["lighthouse_steps"] == b["lighthouse_steps"] and a["final_step"] == b["final_step"]


@pytest.mark.parametrize("stop", [2, 5], ids=["before the switch", "after the switch"])
def test_n_steps_then_resume_for_m_equals_n_plus_m_straight_through(tmp_path, stop):
    train = _example("train")
    run = [*TINY, "--steps", "8", "--switch-at", "4", "--eval-every", "2"]
    straight = train.main([*run, "--out", str(tmp_path / "straight")])
    train.main([*run, "--stop-at", str(stop), "--out", str(tmp_path / "first")])
    resumed = train.main([*run, "--resume", str(tmp_path / "first" / f"state_{stop}"), "--out", str(tmp_path / "rest")])
    _same_run(straight, resumed)
    assert resumed["lighthouse_steps"] == 4 and resumed["resumed_from"]


def test_a_two_stage_run_branched_from_a_lighthouse_runs_state_equals_one_run_straight_through(tmp_path):
    # the quality study's trick: one Lighthouse run to the longest horizon saves its state at every switch point
    train = _example("train")
    lighthouse = train.main([*TINY, "--steps", "8", "--switch-at", "8", "--save-at", "2,4", "--stop-at", "4",
                             "--out", str(tmp_path / "lighthouse")])
    assert lighthouse["lighthouse_steps"] == 4 and lighthouse["lighthouse_sites"] == 2
    assert sorted(p.name for p in (tmp_path / "lighthouse").glob("state_*")) == ["state_2", "state_4"]
    straight = train.main([*TINY, "--steps", "6", "--switch-at", "4", "--out", str(tmp_path / "straight")])
    branch = train.main([*TINY, "--steps", "6", "--switch-at", "4", "--resume", str(tmp_path / "lighthouse" / "state_4"),
                         "--out", str(tmp_path / "branch")])
    _same_run(straight, branch)
    with pytest.raises(SystemExit, match="it was trained with"):
        train.main([*TINY, "--seed", "1", "--resume", str(tmp_path / "lighthouse" / "state_4"), "--out", str(tmp_path)])


def test_dense_layers_none_runs_every_layer_lighthouse(tmp_path):
    train = _example("train")
    result = train.main([*TINY, "--steps", "2", "--switch-at", "2", "--eval-every", "2", "--dense-layers", "none",
                         "--out", str(tmp_path)])
    assert result["lighthouse_sites"] == 4, result["report"]  # every one of the tiny size's 4 layers


def test_dense_baseline_sees_the_same_batches(tmp_path):
    train = _example("train")
    two_stage = train.main([*TINY, "--recovery", "0.5", "--out", str(tmp_path / "lh")])
    dense = train.main([*TINY, "--recovery", "0.5", "--dense", "--out", str(tmp_path / "dense")])
    assert [p["step"] for p in dense["heldout"]] == [0, 3, 6] and dense["lighthouse_steps"] == 0
    # same initial weights, same first batches: the losses agree while both runs are dense or before updates
    assert dense["heldout"][0]["loss"] == two_stage["heldout"][0]["loss"]
    assert dense["tokens"] == two_stage["tokens"] == 6 * 2 * 256
    assert not (tmp_path / "dense" / "checkpoint").exists()


def test_batches_depend_on_seed_and_index_alone():
    corpus = _example("corpus")
    data = corpus.python_corpus().train
    a, b = corpus.Batches(data, 2, 300, seed=0), corpus.Batches(data, 2, 300, seed=0)
    assert torch.equal(a[7], b[7]) and not torch.equal(a[7], a[8])
    assert not torch.equal(a[7], corpus.Batches(data, 2, 300, seed=1)[7])
    assert a[3].shape == (2, 300) and a[3].dtype == torch.long


def test_packed_batches_restart_positions_where_a_directorys_files_begin():
    corpus = _example("corpus")
    c = corpus.python_corpus()
    begins = set(c.documents.tolist())
    assert c.documents[0] == 0 and len(begins) == c.documents.numel() > 1
    batches = corpus.PackedBatches(c.train, c.documents, 2, 4096, seed=0)
    inside = 0
    for i in range(1000):  # at least 20 batches, and on until a crop holds a document start (the corpus is the venv's)
        if i >= 20 and inside:
            break
        tokens, positions = batches[i]
        assert torch.equal(tokens, corpus.Batches(c.train, 2, 4096, seed=0)[i])  # the same crops
        for row, s in enumerate(batches.crops(i)):
            want = [t for t in range(4096) if t == 0 or s + t in begins]
            assert (positions[row] == 0).nonzero().flatten().tolist() == want
            assert torch.equal(positions[row][1:] - positions[row][:-1] == 1, positions[row][1:] != 0)
            inside += len(want) - 1
    assert inside  # some crops hold a document start


def test_copies_are_the_bytes_that_continue_a_span_seen_earlier():
    corpus = _example("corpus")
    text = b"import numpy as np\nfrom collections import OrderedDict\n" + b"x = 1\n" * 3
    filler = bytes(range(40, 120))
    seq = text + filler + text  # the second copy repeats the first after len(text) + 80 bytes
    found = corpus.copies(torch.tensor(list(seq)))
    distance = len(text) + len(filler)
    start = len(text) + len(filler)
    # every prediction inside the second copy whose last 32 bytes (varied enough) repeat the first copy's
    want = [t for t in range(start + 31, len(seq) - 1) if len(set(seq[t - 31 : t + 1])) >= 8]
    assert found.positions.tolist() == want and set(found.distances.tolist()) == {distance}
    assert bytes(seq[t + 1] for t in want) == text[32:][: len(want)]
    # runs of one byte, or bytes seen once, are no copies
    assert corpus.copies(torch.tensor([32] * 200)).positions.numel() == 0
    assert corpus.copies(torch.arange(200)).positions.numel() == 0


def test_evaluator_scores_copy_positions_by_distance(tmp_path):
    train = _example("train")
    corpus = _example("corpus")
    args = train.parse(TINY)
    # held-out bytes that repeat with periods of 40 and 160 (two distance buckets at 256 tokens), so that every
    # window the evaluator draws holds copy positions; a window of the machine's own source files may hold none
    g = torch.Generator().manual_seed(0)
    held = torch.cat([torch.randint(0, 256, (period,), generator=g, dtype=torch.uint8).repeat(4000 // period)
                      for period in (40, 160)])
    evaluator = train.Evaluator(held, args, torch.device("cpu"), train.contextlib.nullcontext)

    class Copier(torch.nn.Module):
        """Predicts at every position the byte that followed the latest earlier occurrence of its 32-byte window,
        where there is one (every copy position among them; it sees only its input, as a model does), uniform
        elsewhere."""

        training = False

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, corpus.VOCAB)
            w = corpus.WINDOW
            for row, ids in enumerate(input_ids):
                windows = ids.unfold(0, w, 1)  # windows[e - w + 1] ends at e
                same = (windows[:, None] == windows[None]).all(-1).tril(-1)  # [t, s]: s < t, the same window
                t, s = same.nonzero().unbind(1)
                latest = torch.zeros(len(windows), dtype=torch.long).scatter_reduce(0, t, s, "amax")
                found = same.any(1)
                ends = torch.arange(len(windows))[found] + w - 1
                logits[row, ends, ids[latest[found] + w]] = 100.0
            return type("Out", (), {"logits": logits})()

    result = evaluator(Copier())
    scored = [v for v in result["copy"].values() if v["positions"]]
    assert scored and all(v["accuracy"] == 1.0 and v["loss"] < 1e-3 for v in scored)
    assert result["loss"] > 1.0  # uniform on the other positions


def test_quality_study_smoke_runs_the_plan_and_judges_every_criterion(tmp_path):
    study = _example("quality_study")
    summary = study.main(["--smoke", "--out", str(tmp_path)])
    names = sorted(summary["runs"])
    assert names == ["dense_s0", "lighthouse_s0", "two_stage_s0_h16_sw12", "two_stage_s0_h16_sw8", "two_stage_s0_h8_sw4"]
    assert set(summary["verdict"]) == set(study.CRITERIA)
    assert all(v["status"] in ("pass", "fail", "not reached") for v in summary["verdict"].values())
    rows = {r["run"]: r for r in summary["rows"]}
    branch, dense = summary["runs"]["two_stage_s0_h8_sw4"], summary["runs"]["dense_s0"]
    assert rows["two_stage_s0_h8_sw4"]["dense_same_steps"] == next(p["loss"] for p in dense["heldout"] if p["step"] == 8)
    assert branch["lighthouse_steps"] == 4 and branch["final_step"] == 8
    assert (tmp_path / "frontier.png").stat().st_size > 0 and (tmp_path / "schedule.json").exists()
    # the two stretches rerun alone repeat the same steps of the same runs (on CPU, tokens/s say nothing)
    assert set(summary["parallel"]) == {"lighthouse", "dense"}
    assert all(v["steps"] == [4, 8] and v["alone_tokens_per_s"] > 0 for v in summary["parallel"].values())
    alone = json.loads((tmp_path / "alone" / "dense" / "summary.json").read_text())
    assert alone["final_heldout_loss"] == summary["runs"]["two_stage_s0_h8_sw4"]["final_heldout_loss"]
    # every run ends with the passkey test on the same prompts; the study compares the two recipes' at 16 steps
    passkey = json.loads((tmp_path / "dense_s0" / "summary.json").read_text())["passkey"]
    assert passkey["prompts"] == 2 * 7 * 2 and passkey["contexts"] == [128, 256]
    retrieval = summary["verdict"]["retrieval"]
    assert retrieval["status"] in ("pass", "fail") and retrieval["dense"] == passkey["mean"]
    assert (tmp_path / "passkey_dense.png").stat().st_size > 0 and (tmp_path / "passkey_two_stage.png").exists()
    again = study.main(["--smoke", "--out", str(tmp_path)])  # every run done: nothing runs again
    assert again["rows"] == summary["rows"]


def test_an_ab_of_dense_layers_trains_each_arm_as_named_and_compares_them_seed_by_seed(tmp_path):
    study = _example("quality_study")
    result = study.main(["--smoke", "--ab", "dense-layers", "--out", str(tmp_path)])
    rows = result["rows"]
    assert sorted(rows) == ["every_layer_s0", "recipe_s0"]
    # the tiny size has 4 layers and keeps layers 0 and -1 dense; the other arm runs Lighthouse in all of them
    assert rows["recipe_s0"]["lighthouse_sites"] == 2 and rows["every_layer_s0"]["lighthouse_sites"] == 4
    difference = rows["every_layer_s0"]["final"] - rows["recipe_s0"]["final"]
    assert result["means"]["paired_differences"] == [pytest.approx(difference)]
    assert result["means"]["gap"] == pytest.approx(rows["every_layer_s0"]["final"] / rows["recipe_s0"]["final"] - 1)
    assert (tmp_path / "ab_dense_layers.png").stat().st_size > 0
    again = study.main(["--smoke", "--ab", "dense-layers", "--out", str(tmp_path)])["rows"]  # nothing runs again
    assert [(r["final"], r["train_s"]) for r in again.values()] == [(r["final"], r["train_s"]) for r in rows.values()]


def test_the_scorer_study_trains_each_scorer_and_dense_and_judges_retrieval_and_speed(tmp_path):
    study = _example("quality_study")
    result = study.main(["--smoke", "--ab", "scorer", "--out", str(tmp_path)])
    rows = result["rows"]
    assert sorted(rows) == ["dense_s0", "dilated_s0", "norm_s0"]
    summaries = {n: json.loads((tmp_path / n / "summary.json").read_text()) for n in rows}
    assert [summaries[n]["scorer"] for n in ("norm_s0", "dilated_s0", "dense_s0")] == ["norm", "dilated", None]
    assert rows["dense_s0"]["lighthouse_sites"] == 0 and rows["dilated_s0"]["lighthouse_sites"] == 2
    assert rows["norm_s0"]["final"] != rows["dilated_s0"]["final"]  # the scorers select otherwise
    assert set(result["verdict"]) == set(study.SCORER_CRITERIA)
    assert all(v["status"] in ("pass", "fail") for v in result["verdict"].values()), result["verdict"]
    assert result["verdict"]["retrieval"]["dense"] == rows["dense_s0"]["passkey"]["mean"]
    assert all((tmp_path / f"passkey_{arm}.png").exists() for arm in ("norm", "dilated", "dense"))


def test_a_device_named_twice_takes_two_runs_side_by_side(tmp_path):
    study = _example("quality_study")
    jobs = study.ab_jobs(study.SMOKE, "dense-layers")
    study.run_all(study.SMOKE, tmp_path, ["cpu", "cpu"], 1, jobs)  # each run its own process
    schedule = json.loads((tmp_path / "schedule.json").read_text())
    first, second = (schedule[j.name] for j in jobs)
    assert first["returncode"] == second["returncode"] == 0
    assert max(first["start"], second["start"]) < min(first["end"], second["end"])


def _curve(losses, every=100, seconds_per_step=0.1):
    return [{"step": i * every, "loss": l, "train_s": i * every * seconds_per_step} for i, l in enumerate(losses)]


def test_the_drop_is_the_steepest_late_fall_and_the_criteria_are_judged_past_it():
    study = _example("quality_study")
    # early learning (not the transition), a plateau, the drop at 2000-2300, then flat
    curve = [3.0, 2.0, 1.6, 1.5, 1.45, 1.4, 1.38, 1.36, 1.35, 1.34, 1.33, 1.32, 1.31, 1.3, 1.29, 1.28, 1.27, 1.26, 1.25,
             1.24, 1.2, 0.9, 0.8, 0.78, 0.77, 0.77, 0.76, 0.76, 0.76, 0.75, 0.75] + [0.75] * 5
    drop = study.drop(_curve(curve))
    assert (drop["from_step"], drop["to_step"]) == (1900, 2200) and drop["fall"] == pytest.approx(0.44)
    assert drop["last_window_fall"] == pytest.approx(0.0) and drop["last_1000_steps_fall"] == pytest.approx(0.02)
    assert study.past_drop(_curve(curve)) and not study.past_drop(_curve(curve[:23]))  # at 2200: still falling
    plan = study.Plan(horizons=[2000, 3000], share=0.7, extra_shares=[], seeds=[0, 1])
    dense = {s: {"heldout": _curve(curve)} for s in (0, 1)}

    def row(horizon, loss, seconds, past=True):
        return {"run": f"r{horizon}", "horizon": horizon, "switch": round(0.7 * horizon), "two_stage": loss,
                "two_stage_train_s": seconds, "dense_train_s": horizon * 0.1, "past_drop": past,
                "dense_same_wall_clock": study.value_at(_curve(curve), "train_s", seconds)}

    rows = [row(2000, 0.70, 120), row(2000, 0.70, 120), row(3000, 0.757, 180), row(3000, 0.757, 180)]
    verdict = study.judge(plan, rows, dense)
    assert verdict["final_loss"]["horizon"] == 3000 and verdict["final_loss"]["status"] == "pass"
    assert verdict["wall_clock"]["speedup"] == pytest.approx(300 / 180) and verdict["wall_clock"]["status"] == "pass"
    assert verdict["frontier"]["status"] == "pass"
    rows[2]["two_stage"] = rows[3]["two_stage"] = 0.80  # 7% worse than dense at 3000 steps
    assert study.judge(plan, rows, dense)["final_loss"]["status"] == "fail"
    rows[2]["past_drop"] = False  # then 3000 is not judged; at 2000 dense is mid-drop: nothing is
    assert study.judge(plan, rows, dense)["final_loss"]["status"] == "not reached"


class _Reader(torch.nn.Module):
    """A byte model that answers the passkey by reading it (the digit after the first "key is "), or always
    ``digit``."""

    def __init__(self, digit: int | None = None) -> None:
        super().__init__()
        self.digit, self.weight = digit, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, logits_to_keep=0):
        logits = torch.zeros(input_ids.shape[0], 1, 259)
        for row, ids in enumerate(input_ids.tolist()):
            text = bytes(ids).decode()
            digit = self.digit if self.digit is not None else int(text[text.index("key is ") + 7])
            logits[row, 0, ord(str(digit))] = 1.0
        return type("Out", (), {"logits": logits})


def test_passkey_prompts_are_fixed_by_the_seed_and_retrieval_counts_the_digit_at_the_last_position():
    passkey = _example("passkey")
    tokens, digits, needles = passkey.prompts(512, 30, 6, seed=0)
    again, _, _ = passkey.prompts(512, 30, 6, seed=0)
    assert tokens.shape == (6, 512) and torch.equal(tokens, again)
    assert all(tokens[i, needles[i]] == ord(str(int(digits[i]))) for i in range(6))
    assert bytes(tokens[0, -len(passkey.TAIL):].tolist()) == passkey.TAIL
    deep, _, deep_needles = passkey.prompts(512, 100, 1, seed=0)
    assert needles[0] < 0.4 * 512 and deep_needles[0] > 0.8 * 512  # the depth is where the needle lies
    result = passkey.retrieval(_Reader(), [128, 256], trials=5, batch=2)
    assert result["mean"] == 1.0 and result["prompts"] == 2 * 7 * 5 and result["chance"] == 0.1
    guess = passkey.retrieval(_Reader(digit=3), [128, 256], trials=5)
    threes = [int((passkey.prompts(c, d, 5, 0)[1] == 3).sum()) / 5 for c in (128, 256) for d in passkey.DEPTHS]
    assert guess["mean"] == pytest.approx(sum(threes) / len(threes))


def test_the_retrieval_criterion_compares_seed_means_and_the_worst_cell():
    study = _example("quality_study")
    plan = study.Plan(horizons=[100], share=0.7, extra_shares=[], seeds=[0, 1])

    def result(cells):
        return {"accuracy": dict(zip(["4096,0", "4096,50"], cells)), "chance": 0.1, "mean": sum(cells) / 2}

    dense = {s: {"final_step": 100, "passkey": result([0.8, 0.6])} for s in (0, 1)}
    rows = [{"horizon": 100, "switch": 70, "passkey": result(cells)} for cells in ([0.8, 0.6], [0.8, 0.5])]
    verdict = study.retrieval_verdict(plan, rows, dense)
    assert verdict["status"] == "pass" and verdict["two_stage"] == pytest.approx(0.675)
    assert verdict["worst_cell"] == "4096,50" and verdict["worst_cell_below_dense"] == pytest.approx(0.05)
    rows[1]["passkey"] = result([0.8, 0.1])  # mean 0.575 against 0.7: below dense - 0.03
    assert study.retrieval_verdict(plan, rows, dense)["status"] == "fail"
    assert study.retrieval_verdict(plan, rows, {})["status"] == "not reached"
