"""The README's main job runs end to end at tiny size, and its checkpoint loads into plain transformers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import LlamaForCausalLM


def _train_module():
    spec = importlib.util.spec_from_file_location("train", Path(__file__).parents[1] / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_stage_training_runs_and_checkpoint_reloads(tmp_path):
    train = _train_module()
    result = train.main(["--steps", "3", "--recovery-steps", "2", "--seq-len", "128", "--batch", "2",
                         "--eval-batches", "1", "--out", str(tmp_path)])
    assert len(result["train"]) == 5 and all(torch.isfinite(torch.tensor(l)) for _, l in result["train"])
    assert [s for s, _ in result["heldout"]] == [3, 5]
    assert (tmp_path / "loss.png").stat().st_size > 0
    model = result["model"].eval()
    plain = LlamaForCausalLM.from_pretrained(result["checkpoint"]).to(model.device, model.dtype).eval()
    trained, loaded = model.state_dict(), plain.state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    ids = torch.randint(0, 259, (1, 64), device=model.device)
    with torch.no_grad():
        got, want = plain(ids).logits, model(ids).logits
    if model.device.type == "cpu":  # the CPU default runs eagerly: same code, same weights, same bits
        assert torch.equal(got, want)
    else:  # on GPU the trained model runs through Inductor, which fuses bf16 ops differently
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_dense_baseline_uses_the_same_data_and_reports_passkey_accuracy(tmp_path):
    train = _train_module()
    args = ["--steps", "2", "--recovery-steps", "1", "--seq-len", "128", "--batch", "2", "--eval-batches", "1",
            "--passkey-trials", "1"]
    two_stage = train.main([*args, "--out", str(tmp_path / "lh")])
    dense = train.main([*args, "--dense", "--out", str(tmp_path / "dense")])
    assert len(dense["train"]) == len(two_stage["train"]) == 3  # same token budget
    assert [s for s, _ in dense["heldout"]] == [3]  # no switch point: evaluated once, at the end
    assert 0.0 <= dense["passkey"] <= 1.0
    assert (tmp_path / "dense" / "summary.json").stat().st_size > 0


def test_passkey_probe_scores_the_hidden_digit_at_the_last_position():
    train = _train_module()

    class Oracle(torch.nn.Module):  # answers with the first digit byte of its prompt
        def forward(self, input_ids):
            digit = input_ids[0][(input_ids[0] >= ord("0")) & (input_ids[0] <= ord("9"))][0]
            logits = torch.zeros(1, input_ids.shape[1], 259)
            logits[0, -1, digit] = 1.0
            return type("Out", (), {"logits": logits})()

    assert train.passkey_accuracy(Oracle(), 256, "cpu", trials=3) == 1.0


def test_corpus_is_the_stdlib_split_into_train_and_heldout():
    train, held = _train_module().stdlib_corpus()
    assert train.numel() > 10 * held.numel() > 0
    assert b"def " in bytes(train[:200000].to(torch.uint8).tolist())


def test_context_parallel_launcher_trains_on_two_cpu_processes():
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "examples/train_cp.py",
         "--steps", "2", "--warmup", "1", "--seq-len", "512"],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in run.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and losses[-1] < losses[0], run.stdout
    # per-layer fully_shard (the default wrap): every layer decided on its own, the outer two kept dense
    assert "2 of 4 SDPA sites rewritten" in run.stdout and "model.layers.1.self_attn" in run.stdout, run.stdout
    assert "CP=2, N=512:" in run.stdout
