"""Is the two-stage recipe as good as dense? Lighthouse → dense against dense from scratch, same seed and batches.

    python examples/quality_check.py                      # on a GPU: the experiment of BENCHMARKS.md, both runs
    python examples/quality_check.py --runs dense         # one run at a time (each writes <out>/<run>/summary.json)
    python examples/quality_check.py --runs               # no run: report on the runs already in --out
    python examples/quality_check.py --smoke              # CPU plumbing check in a minute (says nothing of quality)
    python examples/train.py --dense --seed 1 --no-save --out runs/quality/dense_seed1    # the noise floor

Dense runs with other seeds found in --out (dense_seed*/summary.json) are reported as the noise floor: how far
dense from scratch moves with its seed alone (initial weights and batch order).

Both runs are examples/train.py with the same arguments (one with --dense). The report compares them against
the criteria written down before the experiment (CRITERIA below, BENCHMARKS.md), prints the held-out curves,
the position-bucket and probe tables and the verdict, and writes into --out: compare.png (held-out loss against
tokens and against training wall clock, the switch marked) and quality.json (what docs/quality-h100.json keeps).
Arguments it does not know go to train.py (e.g. --steps 600 --recovery 0.4).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import train  # noqa: E402

RUNS = ("dense", "two_stage")
SMOKE = ["--size", "tiny", "--steps", "20", "--eval-every", "5", "--eval-batches", "1", "--probe-batches", "2"]
CRITERIA = {
    "final_loss": "two-stage final held-out loss <= dense + 1%",
    "long_bucket": "two-stage loss on the last position bucket (16-32K at 32K) <= dense + 1%",
    "probe": "probe valid if dense >= 50% per digit; then two-stage within 5 points of dense",
    "recovery": "two-stage within 1% of dense at most 200 steps after the switch",
    "wall_clock": "whole two-stage recipe >= 1.7x less training wall clock than dense (compile excluded)",
}


def verdict(dense: dict, two: dict) -> dict:
    """Each pre-registered criterion: the numbers it was judged on and 'pass', 'fail' or 'invalid'."""
    def within(a: float, b: float) -> bool:
        return a <= b * 1.01

    result = {}
    gap = two["final_heldout_loss"] / dense["final_heldout_loss"] - 1
    result["final_loss"] = {"gap": gap, "status": "pass" if gap <= 0.01 else "fail"}
    last = list(dense["final_buckets"])[-1]
    long_gap = two["final_buckets"][last] / dense["final_buckets"][last] - 1
    result["long_bucket"] = {"bucket": last, "gap": long_gap, "status": "pass" if long_gap <= 0.01 else "fail"}
    d, t = dense["probe"]["per_digit"], two["probe"]["per_digit"]
    result["probe"] = {"dense": d, "two_stage": t,
                       "status": "invalid" if d < 0.5 else ("pass" if t >= d - 0.05 else "fail")}
    switch = two["lighthouse_steps"]
    dense_at = {p["step"]: p["loss"] for p in dense["heldout"]}
    caught = [p["step"] for p in two["heldout"] if p["step"] > switch and within(p["loss"], dense_at[p["step"]])]
    steps = caught[0] - switch if caught else None
    result["recovery"] = {"steps_after_switch": steps, "status": "pass" if steps is not None and steps <= 200 else "fail"}
    speedup = dense["train_s"] / two["train_s"]
    result["wall_clock"] = {"speedup": speedup,
                            "speedup_with_compile": (dense["train_s"] + dense["compile_s"]) / (two["train_s"] + two["compile_s"]),
                            "status": "pass" if speedup >= 1.7 else "fail"}
    result["beats_dense"] = gap < 0
    return result


def compact(run: dict) -> dict:
    keep = ("run", "size", "parameters", "steps", "tokens", "tokens_per_step", "lighthouse_steps", "lighthouse_sites",
            "final_heldout_loss", "final_buckets", "probe", "probe_at_switch", "train_s", "compile_s", "eval_s",
            "heldout", "corpus")
    return {k: run[k] for k in keep if k in run}


def report(out: Path) -> dict:
    runs = {name: json.loads((out / name / "summary.json").read_text()) for name in RUNS}
    dense, two = runs["dense"], runs["two_stage"]
    if dense["tokens"] != two["tokens"] or dense["size"] != two["size"]:
        raise SystemExit("quality_check: the two runs differ in size or tokens; they are not comparable")
    switch = two["lighthouse_steps"]
    print(f"\nheld-out loss (dense attention), {two['size']} size, switch after step {switch}:")
    print(f"{'step':>6} {'dense':>8} {'two-stage':>10} {'gap':>8}")
    dense_at = {p["step"]: p for p in dense["heldout"]}
    for p in two["heldout"]:
        d = dense_at[p["step"]]["loss"]
        mark = f"  ← switch (Lighthouse attention: {p['lighthouse_loss']:.4f})" if "lighthouse_loss" in p else ""
        print(f"{p['step']:>6} {d:>8.4f} {p['loss']:>10.4f} {p['loss'] / d - 1:>+8.2%}{mark}")
    print(f"\n{'bucket':>10} {'dense':>8} {'two-stage':>10} {'gap':>8}")
    for bucket, d in dense["final_buckets"].items():
        t = two["final_buckets"][bucket]
        print(f"{bucket:>10} {d:>8.4f} {t:>10.4f} {t / d - 1:>+8.2%}")
    print(f"\n{'probe (distance)':>18} {'dense digit/exact':>18} {'two-stage digit/exact':>22} {'queries':>8}")
    pct = lambda x, w: f"{x:>{w}.1%}" if x is not None else f"{'-':>{w}}"  # noqa: E731
    for label, d, t in [("all", dense["probe"], two["probe"]),
                        *((k, dense["probe"]["by_distance"][k], v) for k, v in two["probe"]["by_distance"].items())]:
        print(f"{label:>18} {pct(d['per_digit'], 9)} / {pct(d['exact'], 5)} {pct(t['per_digit'], 13)} / "
              f"{pct(t['exact'], 5)} {t['queries']:>8}")
    for name, run in runs.items():
        print(f"{name}: training {run['train_s']:.0f} s, compile {run['compile_s']:.0f} s, evaluation {run['eval_s']:.0f} s")
    seeds = {path.parent.name: json.loads(path.read_text()) for path in sorted(out.glob("dense_seed*/summary.json"))}
    for name, run in seeds.items():
        print(f"noise floor: {name} ends at {run['final_heldout_loss']:.4f}, "
              f"{run['final_heldout_loss'] / dense['final_heldout_loss'] - 1:+.2%} from dense (seed 0); "
              f"two-stage is {two['final_heldout_loss'] / run['final_heldout_loss'] - 1:+.2%} from it")
    result = verdict(dense, two)
    print("\npre-registered criteria:")
    for key, rule in CRITERIA.items():
        numbers = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in result[key].items() if k != "status")
        print(f"  {result[key]['status'].upper():<8} {rule} ({numbers})")
    print(f"  two-stage {'beats' if result['beats_dense'] else 'does not beat'} dense from scratch "
          f"({result['final_loss']['gap']:+.2%}; the paper: -1.9% to -5.7%)")
    summary = {"criteria": CRITERIA, "verdict": result, **{name: compact(run) for name, run in runs.items()},
               "noise_floor": {name: compact(run) for name, run in seeds.items()}}
    (out / "quality.json").write_text(json.dumps(summary, indent=1))
    plot({"dense from scratch": dense, **{f"dense, {name[6:].replace('_', ' ')}": run for name, run in seeds.items()},
          "Lighthouse → dense": two}, out / "compare.png")
    print(f"wrote {out / 'quality.json'} and {out / 'compare.png'}")
    return summary


def plot(runs: dict[str, dict], path: Path) -> None:
    """Held-out loss against tokens and against training wall clock of each run (the two-stage one last, its
    Lighthouse-attention loss at the switch as a cross), the switch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two = list(runs.values())[-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    switch = next(p for p in two["heldout"] if p["step"] == two["lighthouse_steps"])
    for ax, x, label in [(axes[0], "tokens", "tokens"), (axes[1], "train_s", "training wall clock (s, compile excluded)")]:
        for name, run in runs.items():
            ax.plot([p[x] for p in run["heldout"]], [p["loss"] for p in run["heldout"]], "o-", ms=3, label=name,
                    alpha=0.5 if "seed" in name else 1.0)
        ax.plot([switch[x]], [switch["lighthouse_loss"]], "kx", ms=8, label="Lighthouse attention at the switch")
        ax.axvline(switch[x], color="k", ls="--", lw=1, label="switch to dense")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss, dense attention (nats/byte)")
    lows = [p["loss"] for run in runs.values() for p in run["heldout"][1:]]
    axes[0].set_ylim(min(lows) * 0.97, min(max(lows), 2 * min(lows)) * 1.03)  # the untrained start is off the scale
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{two['size']} size: {two['parameters'] / 1e6:.1f}M parameters, {two['tokens'] / 1e6:.3g}M tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="runs/quality", help="one folder per run, then the report")
    ap.add_argument("--runs", nargs="*", choices=RUNS, default=list(RUNS), help="runs to make before the report")
    ap.add_argument("--smoke", action="store_true", help="a tiny run pair on CPU: tests the plumbing, not quality")
    args, train_args = ap.parse_known_args(argv)
    out = Path(args.out)
    common = [*(SMOKE if args.smoke else []), *train_args, "--no-save"]
    for name in args.runs:
        train.main([*common, *(["--dense"] if name == "dense" else []), "--out", str(out / name)])
    missing = [name for name in RUNS if not (out / name / "summary.json").exists()]
    if missing:
        print(f"quality_check: no {' or '.join(missing)} run in {out} yet; make it with --runs {' '.join(missing)}")
        return {}
    return report(out)


if __name__ == "__main__":
    main()
