"""Which recipe gives the better model for the same GPU time? Two-stage (Lighthouse → dense) against dense from
scratch across training horizons, past the phase transition.

    python examples/quality_study.py                      # on a GPU machine: every run of the plan, then the report
    python examples/quality_study.py --report-only        # the report on the runs already in --out
    python examples/quality_study.py --smoke              # CPU plumbing check (says nothing of quality)
    python examples/quality_study.py --ab rope --horizons 4000 --out runs/rope_ab   # an A/B of one option (AB)

Every run is examples/train.py. With a warm-up of fixed length and a constant learning rate after it, a run of H
steps is the first H steps of any longer run, and batch i depends on (seed, i) alone. So one dense run per seed
to the longest horizon gives dense from scratch at every horizon, and one Lighthouse run per seed gives every
switch point: it saves its state there, and each two-stage run resumes from it and goes on dense to its own
horizon. The runs go to the machine's GPUs one per GPU (longest ready run first), each with bounded CPU threads
and its batches built by DataLoader workers.

The report (study.json, frontier.png in --out): held-out loss against training wall clock and against tokens
for every run of both recipes; per horizon, dense against two-stage (seeds, wall clock); where each run has its
sharp drop (the phase transition); the copy loss by distance (in-context retrieval); tokens/s of two stretches
rerun alone at the end against the same steps trained while every GPU was busy; passkey retrieval (examples/
passkey.py, run at the end of every run) of both recipes at the longest horizon, with their heatmaps; and the
verdict on the criteria (CRITERIA below).
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
    "retrieval": "at the longest horizon, two-stage passkey retrieval (mean of seeds) >= dense's - 0.03, and no "
                 "(context, depth) cell more than 0.2 below dense's",
}
DROP_WINDOW = 300
"""Steps over which the phase transition's drop is measured: the steepest fall of held-out loss over this many."""
EARLY = 1000
"""Steps of early learning (the fall from the untrained model), not searched for the transition."""
SETTLED = 0.1
"""Most a curve past its drop may still fall over its last DROP_WINDOW steps (nats)."""
AB = {
    "rope": {"before_pooling": ["--rope", "before_pooling"], "after_selection": ["--rope", "after_selection"]},
    "dense-layers": {"recipe": [], "every_layer": ["--dense-layers", "none"]},
    "scorer": {"norm": ["--scorer", "norm"], "dilated": ["--scorer", "dilated"], "dense": ["--dense"]},
}
"""The A/Bs of one option of train.py, each a pair of arms (name: train.py arguments), the first the reference:
where Lighthouse rotates q and k (LighthouseConfig.rope), the size's dense layers in the Lighthouse stage against
none, and the two scorers against dense from scratch (the retrieval study: SCORER_CRITERIA)."""
SCORER_CRITERIA = {
    "retrieval": "the better two-stage arm's passkey retrieval (mean of seeds) >= dense's - 0.03, and no (context, "
                 "depth) cell of its seed-mean heatmap more than 0.2 below dense's",
    "dilated_speed": "the dilated arm's Lighthouse-stage tokens/s >= 0.75x the norm arm's",
}


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
    alone_steps: int = 200
    """Steps of each stretch rerun alone at the end (a multiple of the runs' evaluation interval)."""

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
        if str(HERE) not in sys.path:  # train.py imports corpus.py by name
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


def ab_jobs(plan: Plan, ab: str) -> list[Job]:
    """An A/B of AB: per seed, a two-stage run of the longest horizon in each arm (docs: BENCHMARKS.md)."""
    h = plan.longest
    switch = round(plan.share * h)
    return [Job(f"{arm}_s{seed}", ["--steps", str(h), "--switch-at", str(switch), "--seed", str(seed), *args], steps=h)
            for seed in plan.seeds for arm, args in AB[ab].items()]


def run_all(plan: Plan, out: Path, devices: list[str | None], threads: int, planned: list[Job] | None = None) -> None:
    """Run every job not done yet (of ``planned``, default: the study's), one per entry of ``devices`` (a device
    named twice takes two runs side by side; None: in this process, one after the other), the longest ready one
    first; log each to <out>/<job>.log and when each started and ended to <out>/schedule.json."""
    todo = [j for j in planned or jobs(plan, out) if not (out / j.name / "summary.json").exists()]
    schedule_path = out / "schedule.json"
    schedule = json.loads(schedule_path.read_text()) if schedule_path.exists() else {}
    running: dict[int, tuple[Job, object]] = {}  # by slot: an index into devices
    while todo or running:
        for slot, (job, proc) in list(running.items()):
            if proc.poll() is not None:
                del running[slot]
                schedule[job.name]["end"], schedule[job.name]["returncode"] = time.time(), proc.returncode
                print(f"[{time.strftime('%H:%M:%S')}] {job.name} finished: exit {proc.returncode}", flush=True)
        free = [slot for slot in range(len(devices)) if slot not in running]
        ready = sorted((j for j in todo if j.needs is None or Path(j.needs, "state.pt").exists()),
                       key=lambda j: -j.steps)
        for slot, job in zip(free, ready):
            todo.remove(job)
            schedule[job.name] = {"device": devices[slot], "start": time.time()}
            print(f"[{time.strftime('%H:%M:%S')}] {job.name} started on device {devices[slot]!r}", flush=True)
            running[slot] = (job, _launch(plan, job, out, devices[slot], threads))
        schedule_path.write_text(json.dumps(schedule, indent=1))
        if todo and not running and not ready:
            raise SystemExit(f"quality_study: {[j.name for j in todo]} wait for states that no run will write")
        if running and (len(running) == len(devices) or not ready):
            time.sleep(2)


def alone_jobs(plan: Plan, out: Path) -> list[tuple[Job, str, int]]:
    """Two stretches of the plan rerun with nothing else on the machine, from the first Lighthouse state: the
    Lighthouse run's next steps, and the dense steps of the two-stage run branched there (job, the run it repeats,
    first step). Their tokens/s against the same steps trained while every GPU was busy show whether runs side by
    side slow each other."""
    seed, h, shortest = plan.seeds[0], plan.longest, min(plan.horizons)
    first = round(plan.share * shortest)
    state, stop = str(out / f"lighthouse_s{seed}" / f"state_{first}"), str(first + plan.alone_steps)
    return [(Job("lighthouse", ["--resume", state, "--steps", str(h), "--switch-at", str(h), "--stop-at", stop,
                                "--seed", str(seed)]), f"lighthouse_s{seed}", first),
            (Job("dense", ["--resume", state, "--steps", str(shortest), "--switch-at", str(first), "--stop-at",
                           stop, "--seed", str(seed)]), f"two_stage_s{seed}_h{shortest}_sw{first}", first)]


def run_alone(plan: Plan, out: Path, device: str | None, threads: int) -> None:
    (out / "alone").mkdir(exist_ok=True)
    for job, _, _ in alone_jobs(plan, out):
        if not (out / "alone" / job.name / "summary.json").exists():
            proc = _launch(plan, job, out / "alone", device, threads)
            while proc.poll() is None:
                time.sleep(1)


def tokens_per_second(run: dict, first: int, last: int) -> float | None:
    points = {p["step"]: p for p in run["heldout"]}
    if first not in points or last not in points:
        return None
    return (last - first) * run["tokens_per_step"] / (points[last]["train_s"] - points[first]["train_s"])


def alone_vs_together(plan: Plan, out: Path, runs: dict[str, dict]) -> dict:
    result = {}
    for job, repeated, first in alone_jobs(plan, out):
        path = out / "alone" / job.name / "summary.json"
        if path.exists() and repeated in runs:
            last = first + plan.alone_steps
            alone = tokens_per_second(json.loads(path.read_text()), first, last)
            together = tokens_per_second(runs[repeated], first, last)
            result[job.name] = {"steps": [first, last], "alone_tokens_per_s": alone,
                                "together_tokens_per_s": together, "run": repeated}
    return result


# -- the report ------------------------------------------------------------------------------------


def drop(points: list[dict]) -> dict | None:
    """The steepest fall of held-out loss over DROP_WINDOW steps after the first EARLY steps (the phase
    transition; in a two-stage run it may merge with the recovery from the switch), the fall over the last
    DROP_WINDOW steps, and over the last 1000 (how flat the curve has become). None if the curve is too short."""
    steps = np.array([p["step"] for p in points])
    loss = np.array([p["loss"] for p in points])
    windows = [(i, j) for i, s in enumerate(steps) if s >= EARLY
               and (j := int(np.searchsorted(steps, s + DROP_WINDOW))) < len(steps) and steps[j] == s + DROP_WINDOW]
    if not windows:
        return None
    i, j = max(windows, key=lambda w: loss[w[0]] - loss[w[1]])
    last = loss[steps >= steps[-1] - DROP_WINDOW]
    tail = loss[steps >= steps[-1] - 1000]
    return {"from_step": int(steps[i]), "to_step": int(steps[j]), "fall": float(loss[i] - loss[j]),
            "last_window_fall": float(last[0] - last[-1]), "last_1000_steps_fall": float(tail[0] - tail[-1])}


def past_drop(points: list[dict]) -> bool:
    """Whether a curve is past its drop: its steepest fall after EARLY steps came before its last DROP_WINDOW
    steps, which fall by less than a third of it and less than SETTLED."""
    d = drop(points)
    return (d is not None and d["to_step"] < points[-1]["step"]
            and d["last_window_fall"] < min(d["fall"] / 3, SETTLED))


def value_at(points: list[dict], key: str, x: float, value: str = "loss") -> float | None:
    """A curve's value (held-out loss, or train_s) at x (a step or train_s), linearly interpolated; None outside."""
    xs = [p[key] for p in points]
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, [p[value] for p in points]))


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
                     "past_drop": past_drop(run["heldout"]), "drop": run["drop"], "copy": run["final_copy"],
                     "passkey": run.get("passkey")})

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
    print(f"\nphase transition (steepest fall of held-out loss over {DROP_WINDOW} steps after step {EARLY}) and "
          "flatness (fall over the last steps):")
    for name, run in runs.items():
        d = run["drop"]
        if d:
            print(f"  {name:<28} steps {d['from_step']:>5}-{d['to_step']:<5} fall {d['fall']:.3f}; last "
                  f"{DROP_WINDOW} steps {d['last_window_fall']:+.3f}, last 1000 {d['last_1000_steps_fall']:+.3f}")

    verdict = judge(plan, rows, dense)
    parallel = alone_vs_together(plan, out, runs)
    if parallel:
        devices = len({s["device"] for s in json.loads((out / "schedule.json").read_text()).values()})
        print(f"\ntokens/s of the same steps trained alone and while the study ran on {devices} device(s):")
        for stage, v in parallel.items():
            print(f"  {stage:<10} steps {v['steps'][0]}-{v['steps'][1]} of {v['run']}: alone "
                  f"{v['alone_tokens_per_s']:.0f}, together {v['together_tokens_per_s']:.0f} "
                  f"({v['together_tokens_per_s'] / v['alone_tokens_per_s']:.1%})")
    print("\ncriteria:")
    for key, rule in CRITERIA.items():
        v = verdict[key]
        numbers = ", ".join(f"{k} {x:.4g}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items()
                            if k not in ("status", "cells"))
        print(f"  {v['status'].upper():<13} {rule} ({numbers})")
    # the heatmaps' cells stay in study.json, out of the printed verdict
    summary = {"criteria": CRITERIA, "verdict": verdict, "plan": plan.__dict__, "rows": rows, "parallel": parallel,
               "runs": {n: {k: r[k] for k in ("run", "seed", "steps", "switch_step", "lighthouse_steps", "final_step",
                                              "final_heldout_loss", "final_buckets", "final_copy", "train_s",
                                              "compile_s", "eval_s", "tokens", "heldout", "drop")}
                        for n, r in runs.items()}}
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    plot(runs, out / "frontier.png")
    if verdict["retrieval"]["status"] != "not reached":
        from passkey import heatmap

        for arm, result in verdict["retrieval"]["cells"].items():
            heatmap(result, out / f"passkey_{arm}.png", title=f"{arm}, step {plan.longest}, seed mean: ")
    print(f"wrote {out / 'study.json'}, {out / 'frontier.png'} and the passkey heatmaps")
    return summary


def judge(plan: Plan, rows: list[dict], dense: dict[int, dict]) -> dict:
    """The criteria, at the longest horizon where every run of both recipes (shares: plan.share) is past its drop."""
    verdict = {}
    main = [r for r in rows if r["switch"] == round(plan.share * r["horizon"])]
    horizons = sorted({r["horizon"] for r in main}, reverse=True)
    chosen = None
    for h in horizons:
        at = [r for r in main if r["horizon"] == h]
        dense_past = all(past_drop([p for p in d["heldout"] if p["step"] <= h]) for d in dense.values())
        if len(at) >= len(plan.seeds) and all(r["past_drop"] for r in at) and dense_past:
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
    verdict["retrieval"] = retrieval_verdict(plan, rows, dense)
    compared = [r for r in rows if r["dense_same_wall_clock"] is not None]
    worst = max(compared, key=lambda r: r["two_stage"] / r["dense_same_wall_clock"], default=None)
    if worst is None:
        verdict["frontier"] = {"status": "not reached"}
    else:
        ratio = worst["two_stage"] / worst["dense_same_wall_clock"] - 1
        verdict["frontier"] = {"worst_run": worst["run"], "gap_at_equal_wall_clock": ratio, "runs": len(compared),
                               "status": "pass" if ratio <= 0.01 else "fail"}
    return verdict


def seed_mean_passkey(results: list[dict]) -> dict | None:
    """Passkey results (examples/passkey.py, the same prompts in every run) averaged cell by cell."""
    if not results:
        return None
    cells = {key: float(np.mean([r["accuracy"][key] for r in results])) for key in results[0]["accuracy"]}
    return {**results[0], "accuracy": cells, "mean": float(np.mean(list(cells.values()))), "seeds": len(results)}


def retrieval_verdict(plan: Plan, rows: list[dict], dense: dict[int, dict]) -> dict:
    """Passkey retrieval at the longest horizon: two-stage (plan.share) against dense, seed means."""
    two = seed_mean_passkey([r["passkey"] for r in rows if r["horizon"] == plan.longest and r.get("passkey")
                             and r["switch"] == round(plan.share * plan.longest)])
    den = seed_mean_passkey([d["passkey"] for d in dense.values() if d.get("passkey")
                             and d.get("final_step") == plan.longest])
    if two is None or den is None:
        return {"status": "not reached"}
    return {**passkey_against_dense(two, den), "seeds": min(two["seeds"], den["seeds"]), "chance": two["chance"],
            "cells": {"two_stage": two, "dense": den}}


def passkey_against_dense(two: dict, den: dict) -> dict:
    """The retrieval criterion on seed-mean passkey results: two-stage's mean >= dense's - 0.03, and no cell more
    than 0.2 below dense's."""
    worst = min(two["accuracy"], key=lambda key: two["accuracy"][key] - den["accuracy"][key])
    below = den["accuracy"][worst] - two["accuracy"][worst]
    ok = two["mean"] >= den["mean"] - 0.03 and below <= 0.2
    return {"two_stage": two["mean"], "dense": den["mean"], "worst_cell": worst, "worst_cell_below_dense": below,
            "status": "pass" if ok else "fail"}


def plot(runs: dict[str, dict], path: Path) -> None:
    """Held-out loss against training wall clock and against tokens: the dense runs (black), each two-stage run
    from its switch on (colours, final point marked). A Lighthouse run's own held-out loss (its model under dense
    attention before any recovery) is left out: it says nothing of either recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    two = sorted(n for n in runs if n.startswith("two_stage"))
    colors = dict(zip(two, plt.get_cmap("tab10")([0, 1, 2, 3, 4, 5, 6, 8, 9])))
    for ax, x, label in [(axes[0], "train_s", "training wall clock (s, one GPU; compile and evaluation excluded)"),
                         (axes[1], "tokens", "tokens")]:
        for name, run in sorted(runs.items()):
            points = run["heldout"]
            if name.startswith("dense"):
                ax.plot([p[x] for p in points], [p["loss"] for p in points], "k-" if name.endswith("_s0") else "k--",
                        lw=1.5, label=name)
            elif name in colors:
                tail = [p for p in points if p["step"] >= run["switch_step"]]
                ax.plot([p[x] for p in tail], [p["loss"] for p in tail], "-", color=colors[name], lw=1.2)
                ax.plot([tail[-1][x]], [tail[-1]["loss"]], "o", color=colors[name], ms=6, label=name)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss, dense attention (nats/byte)")
    finals = [run["heldout"][-1]["loss"] for run in runs.values() if not run.get("run") == "lighthouse"]
    axes[0].set_ylim(min(finals) * 0.95, max(finals) * 1.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("dense from scratch (black) against Lighthouse → dense (colours: one run per horizon and switch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ab_report(plan: Plan, out: Path, ab: str) -> dict:
    """An A/B of AB: per arm, the two-stage runs' final held-out loss, copy loss by distance, Lighthouse-stage
    tokens/s (steps from the end of warm-up to the switch) and the Lighthouse sites; the second arm against the
    first, seed by seed and on average."""
    arms = list(AB[ab])
    runs = {j.name: json.loads((out / j.name / "summary.json").read_text()) for j in ab_jobs(plan, ab)
            if (out / j.name / "summary.json").exists()}
    if not runs:
        raise SystemExit(f"quality_study: no run of the {ab} A/B in {out} yet")
    rows = {}
    for name, run in runs.items():
        warm = next(p["step"] for p in run["heldout"] if p["step"] >= run["warmup"])
        # tokens/s from the end of warm-up to the switch (the Lighthouse stage; a dense arm's same steps)
        last = round(plan.share * plan.longest)
        rows[name] = {"arm": name.rsplit("_s", 1)[0], "seed": run["seed"], "final": run["final_heldout_loss"],
                      "copy": {b: c["loss"] if c["loss"] is not None else float("nan")
                               for b, c in run["final_copy"].items()},
                      "lighthouse_sites": run.get("lighthouse_sites", 0),
                      "lighthouse_tokens_per_s": tokens_per_second(run, warm, last if last > warm else
                                                                   run["final_step"]),
                      "passkey": run.get("passkey"),
                      "train_s": run["train_s"], "past_drop": past_drop(run["heldout"]), "drop": drop(run["heldout"])}
    buckets = list(next(iter(rows.values()))["copy"])
    print(f"\n{ab} A/B: runs of {plan.longest} steps, two-stage ones switching at {round(plan.share * plan.longest)}")
    print(f"{'run':<24} {'held-out':>8} " + " ".join(f"{'copy ' + b:>13}" for b in buckets)
          + f" {'LH sites':>8} {'LH tok/s':>9} {'passkey':>7} {'past drop':>9}")
    for name, r in sorted(rows.items()):
        key = f"{r['passkey']['mean']:.3f}" if r["passkey"] else "-"
        print(f"{name:<24} {r['final']:>8.4f} " + " ".join(f"{r['copy'][b]:>13.4f}" for b in buckets)
              + f" {r['lighthouse_sites']:>8} {r['lighthouse_tokens_per_s'] or float('nan'):>9.0f} {key:>7}"
              f" {str(r['past_drop']):>9}")
    means = {}
    for arm in arms:
        mine = [r for r in rows.values() if r["arm"] == arm]
        if mine:
            means[arm] = {"final": float(np.mean([r["final"] for r in mine])), "seeds": len(mine),
                          "copy": {b: float(np.mean([r["copy"][b] for r in mine])) for b in buckets},
                          "lighthouse_tokens_per_s": float(np.mean([r["lighthouse_tokens_per_s"] or np.nan
                                                                    for r in mine])),
                          "passkey": seed_mean_passkey([r["passkey"] for r in mine if r["passkey"]])}
    reference = arms[0]
    for other in arms[1:]:
        if reference not in means or other not in means:
            continue
        ref, mine = means[reference], means[other]
        paired = [rows[f"{other}_s{s}"]["final"] - rows[f"{reference}_s{s}"]["final"] for s in plan.seeds
                  if f"{other}_s{s}" in rows and f"{reference}_s{s}" in rows]
        spread = float(np.mean([abs(rows[f"{a}_s{plan.seeds[0]}"]["final"] - rows[f"{a}_s{s}"]["final"])
                                for a in (reference, other) for s in plan.seeds[1:] if f"{a}_s{s}" in rows
                                and f"{a}_s{plan.seeds[0]}" in rows] or [float("nan")]))
        gap = mine["final"] / ref["final"] - 1
        print(f"\nmeans over seeds: {other} {mine['final']:.4f} vs {reference} {ref['final']:.4f} ({gap:+.2%}); "
              f"paired differences {', '.join(f'{d:+.4f}' for d in paired)}; seeds of one arm differ by "
              f"{spread:.4f} on average; Lighthouse tokens/s "
              f"{mine['lighthouse_tokens_per_s'] / ref['lighthouse_tokens_per_s']:.1%} of {reference}'s")
        mine.update(gap=gap, paired_differences=paired, seed_spread=spread)
        if len(arms) == 2:  # one comparison: at the top of the result too
            means["gap"], means["paired_differences"], means["seed_spread"] = gap, paired, spread
    verdict = scorer_verdict(means) if ab == "scorer" else None
    if verdict:
        print("\ncriteria:")
        for key, rule in SCORER_CRITERIA.items():
            v = verdict[key]
            print(f"  {v['status'].upper():<13} {rule} ("
                  + ", ".join(f"{k} {x:.4g}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items()
                              if k != "status") + ")")
        for arm, m in means.items():
            if isinstance(m, dict) and m.get("passkey"):
                from passkey import heatmap

                heatmap(m["passkey"], out / f"passkey_{arm}.png", title=f"{arm}, seed mean: ")
    result = {"ab": ab, "arms": AB[ab], "plan": plan.__dict__, "rows": rows, "means": means, "verdict": verdict,
              "curves": {n: [(p["step"], p["loss"]) for p in r["heldout"]] for n, r in runs.items()}}
    stem = f"ab_{ab.replace('-', '_')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    ab_plot(runs, rows, arms, ab, out / f"{stem}.png")
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")
    return result


def scorer_verdict(means: dict) -> dict:
    """SCORER_CRITERIA on the scorer A/B's seed means: the better two-stage arm's passkey against dense's, and the
    dilated arm's Lighthouse-stage tokens/s against the norm arm's."""
    verdict = {}
    dense = means.get("dense", {}).get("passkey")
    arms = [a for a in ("norm", "dilated") if means.get(a, {}).get("passkey")]
    if dense and arms:
        best = max(arms, key=lambda a: means[a]["passkey"]["mean"])
        verdict["retrieval"] = {"arm": best, **passkey_against_dense(means[best]["passkey"], dense)}
    else:
        verdict["retrieval"] = {"status": "not reached"}
    if "norm" in means and "dilated" in means:
        ratio = means["dilated"]["lighthouse_tokens_per_s"] / means["norm"]["lighthouse_tokens_per_s"]
        verdict["dilated_speed"] = {"ratio": ratio, "status": "pass" if ratio >= 0.75 else "fail"}
    else:
        verdict["dilated_speed"] = {"status": "not reached"}
    return verdict


def ab_plot(runs: dict[str, dict], rows: dict[str, dict], arms: list[str], ab: str, path: Path) -> None:
    """Held-out loss (dense attention) against steps, one colour per arm, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, tail) = plt.subplots(1, 2, figsize=(13, 5))
    colors = dict(zip(arms, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    labelled = set()
    for name, run in sorted(runs.items()):
        arm = rows[name]["arm"]
        steps, loss = zip(*((p["step"], p["loss"]) for p in run["heldout"]))
        for ax in (whole, tail):
            ax.plot(steps, loss, color=colors[arm], lw=1.1, alpha=0.85, label=None if arm in labelled else arm)
        labelled.add(arm)
    switch = next(iter(runs.values()))["switch_step"]
    for ax in (whole, tail):
        ax.axvline(switch, color="grey", ls=":", lw=1)
        ax.set_xlabel("step (dotted: the switch to dense attention)")
        ax.grid(alpha=0.3)
    whole.set_ylabel("held-out loss, dense attention (nats/byte)")
    last = min(r["heldout"][-1]["step"] for r in runs.values())
    finals = [r["heldout"][-1]["loss"] for r in runs.values()]
    tail.set_xlim(switch + (last - switch) // 3, last)
    tail.set_ylim(min(finals) * 0.95, max(finals) * 1.5)
    tail.set_title("after the recovery spike", fontsize=9)
    whole.legend()
    fig.suptitle(f"{ab}: {' against '.join(arms)}; one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SMOKE = Plan(horizons=[8, 16], share=0.5, extra_shares=[0.75], seeds=[0],
             train_args=["--size", "tiny", "--seq-len", "256", "--batch", "2", "--eval-every", "4",
                         "--eval-batches", "1", "--warmup", "2", "--workers", "0", "--passkey-trials", "2"],
             alone_steps=4)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quality_study", help="one folder per run, logs, the report")
    ap.add_argument("--horizons", default="1000,2000,4000,6000", help="steps of each horizon (default: 1000,2000,4000,6000)")
    ap.add_argument("--share", type=float, default=0.7, help="Lighthouse share of each horizon (default: 0.7)")
    ap.add_argument("--extra-shares", default="0.5", help="more Lighthouse shares at the longest horizon (default: 0.5)")
    ap.add_argument("--seeds", default="0,1", help="seeds at the longest horizon; the first at every one (default: 0,1)")
    ap.add_argument("--devices", default=None,
                    help="CUDA devices to use, one run each; name one twice for two runs side by side on it, e.g. 0,0 "
                         "(default: every visible GPU)")
    ap.add_argument("--threads", type=int, default=4, help="CPU threads per run (default: 4)")
    ap.add_argument("--report-only", action="store_true", help="no run: the report on the runs in --out")
    ap.add_argument("--smoke", action="store_true", help="a tiny plan on CPU: tests the plumbing, not quality")
    ap.add_argument("--ab", choices=list(AB), default=None,
                    help="instead: an A/B of one option (AB), two-stage runs of the longest horizon in each arm, each "
                         "seed")
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
        run_all(plan, out, gpus or [None], args.threads, ab_jobs(plan, args.ab) if args.ab else None)
        if not args.ab:
            run_alone(plan, out, (gpus or [None])[0], args.threads)
    return ab_report(plan, out, args.ab) if args.ab else report(plan, out)


if __name__ == "__main__":
    main()
