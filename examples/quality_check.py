"""Quality check: the two-stage Lighthouse → dense recipe against dense from scratch, same seed and tokens.

    python examples/quality_check.py                                    # CPU-sized, a few minutes
    python examples/quality_check.py --seq-len 4096 --batch 8 --steps 600 --recovery-steps 300   # GPU

Runs examples/train.py twice with the given arguments (once with --dense), then prints final held-out loss
(dense attention) and passkey accuracy for both, and writes both loss curves to <out>/compare.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import train  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--tolerance", type=float, default=0.02, help="allowed relative held-out loss gap")
    ap.add_argument("--steps", type=int, default=60, help="Lighthouse steps of the two-stage run")
    args, train_args = ap.parse_known_args(argv)
    train_args += ["--steps", str(args.steps)]
    out = Path(args.out)
    runs = {
        "lighthouse → dense": train.main([*train_args, "--out", str(out / "lighthouse")]),
        "dense from scratch": train.main([*train_args, "--dense", "--out", str(out / "dense")]),
    }
    two_stage, dense = (r["heldout"][-1][1] for r in runs.values())
    gap = (two_stage - dense) / dense
    print(f"\n{'run':<20} {'final held-out loss':>20} {'passkey accuracy':>17}")
    for name, r in runs.items():
        print(f"{name:<20} {r['heldout'][-1][1]:>20.4f} {r['passkey']:>17.0%}")
    verdict = "within" if abs(gap) <= args.tolerance else "NOT within"
    print(f"relative gap {gap:+.2%}: {verdict} {args.tolerance:.0%} of dense from scratch")
    train.plot_losses({name: (r["train"], r["heldout"]) for name, r in runs.items()}, args.steps, out / "compare.png")
    print(f"wrote {out / 'compare.png'}")
    return {"gap": gap, **{name: {k: r[k] for k in ("heldout", "passkey")} for name, r in runs.items()}}


if __name__ == "__main__":
    main()
