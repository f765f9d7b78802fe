"""For the GPU time I have, which recipe gives the better model? Two-stage (Lighthouse → dense) against dense
from scratch across training horizons, past the phase transition.

    python examples/quality_study.py                      # on a GPU machine: every run of the plan, then the report
    python examples/quality_study.py --report-only        # the report on the runs already in --out
    python examples/quality_study.py --smoke              # CPU plumbing check (says nothing of quality)

Every run is examples/train.py. With a warm-up of fixed length and a constant learning rate after it, a run of H
steps is the first H steps of any longer run, and batch i depends on (seed, i) alone. So one dense run per seed
to the longest horizon gives dense from scratch at every horizon, and one Lighthouse run per seed gives every
switch point: it saves its state there, and each two-stage run resumes from it and goes on dense to its own
horizon. The runs go to the machine's GPUs one per GPU (longest ready run first), each with bounded CPU threads
and its batches built by DataLoader workers.

The report (study.json, frontier.png in --out): held-out loss against training wall clock and against tokens
for every run of both recipes; per horizon, dense against two-stage (seeds, wall clock); where each run has its
sharp drop (the phase transition); the copy loss by distance (in-context retrieval); tokens/s of the runs
against how many ran at once; and the verdict on the criteria of BENCHMARKS.md (CRITERIA below).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
CRITERIA = {
    "final_loss": "at the longest horizon where both recipes are past their drop, two-stage (mean of 2 seeds) "
                  "<= dense (mean of 2 seeds) + 1%",
    "wall_clock": "there, the two-stage recipe takes >= 1.6x less training wall clock than dense",
    "frontier": "at every two-stage run's training wall clock, its final loss <= dense's loss at the same wall "
                "clock (seed mean) + 1%",
}
DROP_WINDOW = 300
"""Steps over which the phase transition's drop is measured: the steepest fall of held-out loss over this many."""


@dataclass
class Plan:
    horizons: list[int]
    share: float
    """Lighthouse share of every horizon's steps (the switch at share x H)."""
    extra_shares: list[float]
    """More switch shares tried at the longest horizon (seed 0)."""
    seeds: list[int]
    """Seeds of both recipes at the longest horizon (the first one at every horizon)."""
    train_args: list[str] = field(default_factory=list)

    @property
    def longest(self) -> int:
        return max(self.horizons)


@dataclass
class Job:
    name: str
    args: list[str]
    needs: str | None = None
    """A state folder that must exist before the job starts."""
    steps: int = 0
    """Steps it trains (to order the jobs: longest first)."""


def jobs(plan: Plan, out: Path) -> list[Job]:
    h = plan.longest
    result = []
    for seed in plan.seeds:
        switches = sorted({round(plan.share * x) for x in (plan.horizons if seed == plan.seeds[0] else [h])}
                          | ({round(s * h) for s in plan.extra_shares} if seed == plan.seeds[0] else set()))
        result.append(Job(f"dense_s{seed}", ["--dense", "--steps", str(h), "--seed", str(seed)], steps=h))
        result.append(Job(f"lighthouse_s{seed}", ["--steps", str(h), "--switch-at", str(h), "--stop-at",
                                                  str(max(switches)), "--save-at", ",".join(map(str, switches)),
                                                  "--seed", str(seed)], steps=max(switches)))
        for horizon in (plan.horizons if seed == plan.seeds[0] else [h]):
            for share in [plan.share, *(plan.extra_shares if seed == plan.seeds[0] and horizon == h else [])]:
                switch = round(share * horizon)
                state = out / f"lighthouse_s{seed}" / f"state_{switch}"
                result.append(Job(f"two_stage_s{seed}_h{horizon}_sw{switch}",
                                  ["--resume", str(state), "--steps", str(horizon), "--switch-at", str(switch),
                                   "--seed", str(seed)], needs=str(state), steps=horizon - switch))
    return result


class _Finished:
    """A job run in this process (the CPU smoke check): done when launched."""

    returncode = 0

    def poll(self) -> int:
        return 0


def _launch(plan: Plan, job: Job, out: Path, device: str | None, threads: int):
    args = [*plan.train_args, *job.args, "--threads", str(threads), "--out", str(out / job.name)]
    if device is None:
        sys.path.insert(0, str(HERE))
        import torch
        import train

        torch._dynamo.reset()  # each run compiles a new model: earlier runs' graphs must not use up Dynamo's limit
        train.main(args)
        return _Finished()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": device, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    log = open(out / f"{job.name}.log", "w")
    return subprocess.Popen([sys.executable, str(HERE / "train.py"), *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=HERE)


def run_all(plan: Plan, out: Path, devices: list[str | None], threads: int, alone_steps: int = 0) -> None:
    """Run every job not done yet, one per device (None: in this process, one after the other), the longest ready
    one first; log each to <out>/<job>.log and when each started and ended to <out>/schedule.json. With
    ``alone_steps``, the first Lighthouse run trains that many steps alone before the others start (its tokens/s
    alone, against those with every GPU busy, in the report)."""
    todo = [j for j in jobs(plan, out) if not (out / j.name / "summary.json").exists()]
    schedule_path = out / "schedule.json"
    schedule = json.loads(schedule_path.read_text()) if schedule_path.exists() else {}
    running: dict[str | None, tuple[Job, object]] = {}
    alone = next((j for j in todo if j.name.startswith("lighthouse")), None) if alone_steps else None
    while todo or running:
        for device, (job, proc) in list(running.items()):
            if proc.poll() is not None:
                del running[device]
                schedule[job.name]["end"], schedule[job.name]["returncode"] = time.time(), proc.returncode
                print(f"[{time.strftime('%H:%M:%S')}] {job.name} finished: exit {proc.returncode}", flush=True)
        if alone is not None and alone.name in schedule:
            log = out / f"{alone.name}.log"
            if alone.name in [j.name for j, _ in running.values()] and f" step {alone_steps}:" not in log.read_text():
                time.sleep(2)
                continue
            alone = None
        free = [d for d in devices if d not in running]
        ready = sorted((j for j in todo if j.needs is None or Path(j.needs, "state.pt").exists()),
                       key=lambda j: (j is not alone, -j.steps))
        for device, job in zip(free[:1] if alone is not None else free, ready):
            todo.remove(job)
            schedule[job.name] = {"device": device, "start": time.time()}
            print(f"[{time.strftime('%H:%M:%S')}] {job.name} started on device {device!r}", flush=True)
            running[device] = (job, _launch(plan, job, out, device, threads))
        schedule_path.write_text(json.dumps(schedule, indent=1))
        if todo and not running and not ready:
            raise SystemExit(f"quality_study: {[j.name for j in todo]} wait for states that no run will write")
        if running and (not (set(devices) - set(running)) or not ready):
            time.sleep(2)


# -- the report ------------------------------------------------------------------------------------


def drop(points: list[dict]) -> dict | None:
    """The steepest fall of held-out loss over DROP_WINDOW steps (the phase transition), and how flat the curve is
    over its last 1000 steps."""
    steps = np.array([p["step"] for p in points])
    loss = np.array([p["loss"] for p in points])
    best = None
    for i, s in enumerate(steps):
        j = np.searchsorted(steps, s + DROP_WINDOW)
        if j < len(steps) and s > 0 and (best is None or loss[i] - loss[j] > best["fall"]):
            best = {"from_step": int(s), "to_step": int(steps[j]), "fall": float(loss[i] - loss[j])}
    if best is None:
        return None
    tail = loss[steps >= steps[-1] - 1000]
    best["last_1000_steps_fall"] = float(tail[0] - tail[-1])
    return best


def past_drop(run: dict, margin: int = DROP_WINDOW) -> bool:
    d = run["drop"]
    return d is not None and run["final_step"] >= d["to_step"] + margin


def value_at(points: list[dict], key: str, x: float, value: str = "loss") -> float | None:
    """A curve's value (held-out loss, or train_s) at x (a step or train_s), linearly interpolated; None outside."""
    xs = [p[key] for p in points]
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, [p[value] for p in points]))


def concurrency(runs: dict[str, dict], schedule: dict) -> dict:
    """Tokens/s of each recipe stage (Lighthouse, dense) in intervals between evaluations, by how many runs were
    training at the time (runs on other GPUs of the machine): runs side by side must not slow each other."""
    spans = [(s["start"], s.get("end", float("inf"))) for s in schedule.values()]
    rates: dict[str, dict[int, list[float]]] = {"lighthouse": {}, "dense": {}}
    for name, run in runs.items():
        points = [p for p in run["heldout"] if "wall" in p]
        for a, b in zip(points, points[1:]):
            if b["train_s"] <= a["train_s"] or b["step"] <= a["step"]:
                continue
            stage = "lighthouse" if b["lighthouse_steps"] > a["lighthouse_steps"] else "dense"
            if stage == "lighthouse" and b["lighthouse_steps"] - a["lighthouse_steps"] != b["step"] - a["step"]:
                continue  # the switch falls inside: a mixed interval
            middle = (a["wall"] + b["wall"]) / 2
            together = sum(start <= middle <= end for start, end in spans)
            tokens = (b["step"] - a["step"]) * run["tokens_per_step"]
            rates[stage].setdefault(together, []).append(tokens / (b["train_s"] - a["train_s"]))
    return {stage: {n: {"median_tokens_per_s": float(np.median(r)), "intervals": len(r)} for n, r in sorted(by.items())}
            for stage, by in rates.items()}


def report(plan: Plan, out: Path) -> dict:
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))}
    for run in runs.values():
        run["drop"] = drop(run["heldout"])
    dense = {int(n.split("_s")[1]): r for n, r in runs.items() if n.startswith("dense_s")}
    two = {n: r for n, r in runs.items() if n.startswith("two_stage_")}
    if not dense or not two:
        raise SystemExit(f"quality_study: no dense or no two-stage run in {out} yet")
    rows = []
    for name, run in sorted(two.items(), key=lambda kv: (kv[1]["steps"], kv[1]["switch_step"], kv[1]["seed"])):
        horizon, seed = run["steps"], run["seed"]
        ref = dense.get(seed)
        d_step = value_at(ref["heldout"], "step", horizon) if ref else None
        d_time = [v for r in dense.values() if (v := value_at(r["heldout"], "train_s", run["train_s"])) is not None]
        d_run_s = value_at(ref["heldout"], "step", horizon, "train_s") if ref else None
        rows.append({"run": name, "seed": seed, "horizon": horizon, "switch": run["switch_step"],
                     "two_stage": run["final_heldout_loss"], "dense_same_steps": d_step,
                     "dense_same_wall_clock": float(np.mean(d_time)) if d_time else None,
                     "two_stage_train_s": run["train_s"], "dense_train_s": d_run_s,
                     "past_drop": past_drop(run), "drop": run["drop"], "copy": run["final_copy"]})
    for run in dense.values():
        run["past_drop_at"] = (run["drop"]["to_step"] + DROP_WINDOW) if run["drop"] else None

    print(f"\nheld-out loss (dense attention) by horizon; dense from scratch read off the dense runs at the same step "
          f"(a constant learning rate after {next(iter(dense.values()))['warmup']} warm-up steps at every horizon)")
    print(f"{'run':<28} {'two-stage':>9} {'dense':>8} {'gap':>8} {'dense@time':>10} {'TS s':>7} {'dense s':>7} "
          f"{'speedup':>7} {'past drop':>9}")
    for r in rows:
        gap = r["two_stage"] / r["dense_same_steps"] - 1 if r["dense_same_steps"] else float("nan")
        speed = r["dense_train_s"] / r["two_stage_train_s"] if r["dense_train_s"] else float("nan")
        at_time = f"{r['dense_same_wall_clock']:.4f}" if r["dense_same_wall_clock"] else "-"
        print(f"{r['run']:<28} {r['two_stage']:>9.4f} {r['dense_same_steps'] or float('nan'):>8.4f} {gap:>+8.2%} "
              f"{at_time:>10} {r['two_stage_train_s']:>7.0f} {r['dense_train_s'] or float('nan'):>7.0f} "
              f"{speed:>6.2f}x {str(r['past_drop']):>9}")
    print("\nphase transition (steepest fall of held-out loss over "
          f"{DROP_WINDOW} steps) and flatness (fall over the last 1000 steps):")
    for name, run in runs.items():
        d = run["drop"]
        if d:
            print(f"  {name:<28} steps {d['from_step']:>5}-{d['to_step']:<5} fall {d['fall']:.3f}; "
                  f"last 1000 steps {d['last_1000_steps_fall']:+.3f}")

    verdict = judge(plan, rows, dense)
    schedule = json.loads((out / "schedule.json").read_text()) if (out / "schedule.json").exists() else {}
    parallel = concurrency(runs, schedule) if schedule else {}
    if parallel:
        print("\ntokens/s of one run by how many ran at once (median over evaluation intervals):")
        for stage, by in parallel.items():
            print(f"  {stage:<10} " + ", ".join(f"{n} at once: {v['median_tokens_per_s']:.0f} ({v['intervals']})"
                                                 for n, v in by.items()))
    print("\ncriteria:")
    for key, rule in CRITERIA.items():
        v = verdict[key]
        numbers = ", ".join(f"{k} {x:.4g}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items()
                            if k != "status")
        print(f"  {v['status'].upper():<13} {rule} ({numbers})")
    summary = {"criteria": CRITERIA, "verdict": verdict, "plan": plan.__dict__, "rows": rows, "parallel": parallel,
               "runs": {n: {k: r[k] for k in ("run", "seed", "steps", "switch_step", "lighthouse_steps", "final_step",
                                              "final_heldout_loss", "final_buckets", "final_copy", "train_s",
                                              "compile_s", "eval_s", "tokens", "heldout", "drop")}
                        for n, r in runs.items()}}
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    plot(runs, out / "frontier.png")
    print(f"wrote {out / 'study.json'} and {out / 'frontier.png'}")
    return summary


def judge(plan: Plan, rows: list[dict], dense: dict[int, dict]) -> dict:
    """The criteria, at the longest horizon where every run of both recipes (shares: plan.share) is past its drop."""
    verdict = {}
    main = [r for r in rows if r["switch"] == round(plan.share * r["horizon"])]
    horizons = sorted({r["horizon"] for r in main}, reverse=True)
    chosen = None
    for h in horizons:
        at = [r for r in main if r["horizon"] == h]
        dense_past = [d for d in dense.values() if d["past_drop_at"] is not None and d["past_drop_at"] <= h]
        if len(at) >= len(plan.seeds) and all(r["past_drop"] for r in at) and len(dense_past) == len(dense):
            chosen = h
            break
    if chosen is None:
        verdict["final_loss"] = {"status": "not reached", "horizons": horizons}
        verdict["wall_clock"] = {"status": "not reached"}
    else:
        at = [r for r in main if r["horizon"] == chosen]
        two = float(np.mean([r["two_stage"] for r in at]))
        den = float(np.mean([value_at(d["heldout"], "step", chosen) for d in dense.values()]))
        gap = two / den - 1
        verdict["final_loss"] = {"horizon": chosen, "two_stage": two, "dense": den, "gap": gap,
                                 "seeds": len(at), "status": "pass" if gap <= 0.01 else "fail"}
        speed = float(np.mean([r["dense_train_s"] / r["two_stage_train_s"] for r in at]))
        verdict["wall_clock"] = {"horizon": chosen, "speedup": speed, "status": "pass" if speed >= 1.6 else "fail"}
    compared = [r for r in rows if r["dense_same_wall_clock"] is not None]
    worst = max(compared, key=lambda r: r["two_stage"] / r["dense_same_wall_clock"], default=None)
    if worst is None:
        verdict["frontier"] = {"status": "not reached"}
    else:
        ratio = worst["two_stage"] / worst["dense_same_wall_clock"] - 1
        verdict["frontier"] = {"worst_run": worst["run"], "gap_at_equal_wall_clock": ratio, "runs": len(compared),
                               "status": "pass" if ratio <= 0.01 else "fail"}
    return verdict


def plot(runs: dict[str, dict], path: Path) -> None:
    """Held-out loss against training wall clock and against tokens: dense runs as lines, each two-stage run as a
    line from its switch with its final point marked, the Lighthouse runs faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, x, label in [(axes[0], "train_s", "training wall clock (s, one GPU; compile and evaluation excluded)"),
                         (axes[1], "tokens", "tokens")]:
        for i, (name, run) in enumerate(sorted(runs.items())):
            points = run["heldout"]
            if name.startswith("dense"):
                ax.plot([p[x] for p in points], [p["loss"] for p in points], "-", color="k",
                        alpha=1.0 if name.endswith("s0") else 0.5, lw=1.5, label=name)
            elif name.startswith("lighthouse"):
                ax.plot([p[x] for p in points], [p["loss"] for p in points], ":", color="grey", lw=1,
                        label=f"{name} (its checkpoints, dense attention)")
            else:
                tail = [p for p in points if p["step"] >= run["switch_step"]]
                color = colors[i % len(colors)]
                ax.plot([p[x] for p in tail], [p["loss"] for p in tail], "-", color=color, lw=1.2)
                ax.plot([tail[-1][x]], [tail[-1]["loss"]], "o", color=color, ms=6, label=name)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss, dense attention (nats/byte)")
    lows = [p["loss"] for run in runs.values() for p in run["heldout"][2:]] or [1.0]
    axes[0].set_ylim(min(lows) * 0.95, min(max(lows), 2.5 * min(lows)))
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("dense from scratch (black) against Lighthouse → dense (colours: one run per horizon and switch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SMOKE = Plan(horizons=[8, 16], share=0.5, extra_shares=[0.75], seeds=[0],
             train_args=["--size", "tiny", "--seq-len", "256", "--batch", "2", "--eval-every", "4",
                         "--eval-batches", "1", "--warmup", "2", "--workers", "0"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quality_study", help="one folder per run, logs, the report")
    ap.add_argument("--horizons", default="1000,2000,4000,6000", help="steps of each horizon (default: 1000,2000,4000,6000)")
    ap.add_argument("--share", type=float, default=0.7, help="Lighthouse share of each horizon (default: 0.7)")
    ap.add_argument("--extra-shares", default="0.5", help="more Lighthouse shares at the longest horizon (default: 0.5)")
    ap.add_argument("--seeds", default="0,1", help="seeds at the longest horizon; the first at every one (default: 0,1)")
    ap.add_argument("--devices", default=None, help="CUDA devices to use, one run each (default: every visible GPU)")
    ap.add_argument("--threads", type=int, default=4, help="CPU threads per run (default: 4)")
    ap.add_argument("--alone-steps", type=int, default=200,
                    help="steps the first Lighthouse run trains alone before the others start (default: 200)")
    ap.add_argument("--report-only", action="store_true", help="no run: the report on the runs in --out")
    ap.add_argument("--smoke", action="store_true", help="a tiny plan on CPU: tests the plumbing, not quality")
    args, train_args = ap.parse_known_args(argv)
    if args.smoke:
        plan = SMOKE
    else:
        plan = Plan([int(h) for h in args.horizons.split(",")], args.share,
                    [float(s) for s in args.extra_shares.split(",") if s], [int(s) for s in args.seeds.split(",")],
                    train_args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        import torch

        gpus = args.devices.split(",") if args.devices else [str(i) for i in range(torch.cuda.device_count())]
        run_all(plan, out, gpus or [None], args.threads, args.alone_steps)
    return report(plan, out)


if __name__ == "__main__":
    main()
