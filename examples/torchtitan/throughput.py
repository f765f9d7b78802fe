"""torchtitan's own trainer, Lighthouse per document against its stock dense attention: tokens/s, memory, loss.

Runs ``torchrun -m torchtitan.train --module lighthouse_llama3 --config <name>`` for each config (one GPU by
default), reads torchtitan's per-step log lines and prints a table: median tokens/s per GPU over the steps after
``--warmup`` (compilation happens in the first), the largest ``max_reserved`` memory, the last loss, and the
lhcompile site report the Lighthouse run logged. Every run's whole log is kept beside the table. On a torch older
than torchtitan 0.3.0 targets, the runs start through ``older_torch.py`` (it says what it shims).

    python examples/torchtitan/throughput.py                    # the debug model, FlexAttention, 32K, offline data
    python examples/torchtitan/throughput.py --configs llama3_100m_varlen_dense llama3_100m_varlen_lighthouse \
        -- --training.seq_len 131072
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*([\d.naninf]+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse(log: str) -> dict:
    """torchtitan's training-step lines of one run: step -> (loss, max reserved GiB, tokens/s per GPU)."""
    steps = {}
    for line in ANSI.sub("", log).splitlines():
        if m := STEP.search(line):
            steps[int(m[1])] = (float(m[2]), float(m[3]), float(m[4].replace(",", "")))
    return steps


def summarize(steps: dict, warmup: int) -> dict:
    timed = [tps for step, (_, _, tps) in sorted(steps.items()) if step > warmup]
    if not timed:
        raise SystemExit(f"no step after the {warmup} warm-up steps was logged: run more --steps")
    # each timed step too: a median of few steps hides one-time costs (a cuDNN plan for a new document width)
    return {"steps": len(steps), "tokens_per_s": statistics.median(timed), "timed_tokens_per_s": timed,
            "peak_reserved_gib": max(mem for _, mem, _ in steps.values()),
            "last_loss": steps[max(steps)][0]}


def run(config: str, args: argparse.Namespace, extra: list[str], out: Path) -> tuple[dict, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    import torch.distributed as dist

    # an older torch starts through older_torch.py's shims, and without torchtitan's CUDA graphs, whose capture of
    # the stock dense step fails in its backward there (torch 2.11)
    older = not hasattr(dist, "set_timeout")
    entry = [str(HERE / "older_torch.py")] if older else ["-m", "torchtitan.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}",
           *entry, "--module", "lighthouse_llama3", "--config", config, f"--training.steps={args.steps}",
           *(["--training.disable_cuda_graphs"] if older else []), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    (out / f"{config}.log").write_text(log)
    if done.returncode:
        sys.exit(f"{config} failed (exit {done.returncode}); the end of its log:\n{log[-4000:]}")
    return {**summarize(parse(log), args.warmup), "wall_s": time.perf_counter() - start}, site_report(log)


def site_report(log: str) -> str:
    """The lhcompile report torchtitan logged: its line and the table lines after it (they carry no log prefix)."""
    lines = ANSI.sub("", log).splitlines()
    first = next((i for i, line in enumerate(lines) if "lhcompile: " in line and "attention sites" in line), None)
    if first is None:
        return ""
    end = next((i for i in range(first + 1, len(lines)) if "[titan]" in lines[i]), len(lines))
    return "\n".join(lines[first:end])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["llama3_debugmodel_flex_dense",
                                                         "llama3_debugmodel_flex_lighthouse"],
                        help="config names of lighthouse_llama3; the first is the baseline")
    parser.add_argument("--steps", type=int, default=20, help="training steps of each run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s (compilation)")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--out", default="runs/torchtitan_throughput", help="folder for the logs and results.json")
    parser.add_argument("extra", nargs="*", help="after --: arguments for torchtitan.train")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, reports = {}, {}
    for config in args.configs:
        results[config], reports[config] = run(config, args, args.extra, out)
        print(f"{config}: done in {results[config]['wall_s']:.0f} s", flush=True)
    base = results[args.configs[0]]["tokens_per_s"]
    print(f"\n{'config':<36} {'tokens/s/GPU':>12} {'vs first':>8} {'peak GiB':>9} {'last loss':>9}")
    for config, r in results.items():
        print(f"{config:<36} {r['tokens_per_s']:>12,.0f} {r['tokens_per_s'] / base:>7.2f}x "
              f"{r['peak_reserved_gib']:>9.2f} {r['last_loss']:>9.4f}")
    print(f"\ntokens/s of each step after step {args.warmup}:")
    for config, r in results.items():
        print(f"{config:<36} {' '.join(f'{tps / 1000:.0f}k' for tps in r['timed_tokens_per_s'])}")
    for config, report in reports.items():
        if report:
            print(f"\n{config}:\n{report}")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
