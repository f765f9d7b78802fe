"""Passkey retrieval, the Lighthouse paper's protocol (App. F), on the byte-level models of examples/train.py.

One passkey digit (0-9) is hidden in random alphanumeric filler at a depth of {0, 15, 30, 50, 70, 85, 100}% of the
context; the prompt ends by asking for it, and the prediction is the argmax over the ten digit bytes at the last
position, after one forward pass with dense attention. Chance is 10%. The prompts depend on (seed, context, depth)
alone, so that every model sees the same ones. The paper's contexts are {4, 8, 16, 32, 64, 96}K with 10 trials per
cell; here the contexts are those up to the model's training length.

    python examples/passkey.py --state runs/quality_study/dense_s0/state_4000          # a train.py state
    python examples/passkey.py --state runs/lh/state_1400 --selection 3,6,9 --out runs/passkey_lh
    python examples/passkey.py --size tiny --trials 4                                   # an untrained model (CPU)

Writes passkey.json (accuracy per cell, mean, chance, prompts) and passkey.png (depth x context heatmap) to --out;
with --selection, for one prompt and the model in its Lighthouse stage, what each chosen site's selection covers
(lhcompile.selections), one PNG per site with the needle marked, and the fraction of (site, head) pairs whose
entries cover the needle at each level. examples/train.py runs the evaluation at the end of every run.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import lhcompile

DEPTHS = (0, 15, 30, 50, 70, 85, 100)
"""Where the needle lies, in percent of the filler (the paper's depths)."""
PAPER_CONTEXTS = (4096, 8192, 16384, 32768, 65536, 98304)
FILLER = np.frombuffer((string.ascii_letters + string.digits).encode(), dtype=np.uint8)
DIGITS = [ord(str(d)) for d in range(10)]
CHANCE = 0.1
TAIL = b" What is the pass key? The pass key is "
MIN_CONTEXT = 128
"""Shortest context the evaluation uses: the needle and the question take 87 bytes."""


def needle(digit: int) -> bytes:
    return f" The pass key is {digit}. Remember it. {digit} is the pass key. ".encode()


def contexts_for(seq_len: int) -> list[int]:
    """The paper's contexts up to ``seq_len``; for a model trained shorter than 4K, those of seq_len / 4, / 2 and
    itself that hold a prompt's fixed text and as much filler (MIN_CONTEXT)."""
    fit = [c for c in PAPER_CONTEXTS if c <= seq_len]
    return fit or [c for c in (seq_len // 4, seq_len // 2, seq_len) if c >= MIN_CONTEXT]


def prompt(context: int, depth: int, digit: int, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    """A prompt of exactly ``context`` bytes and the position of its needle's first digit."""
    hidden = needle(digit)
    if context < len(hidden) + len(TAIL):
        raise ValueError(f"passkey: a context of {context} bytes cannot hold the needle and the question "
                         f"({len(hidden) + len(TAIL)} bytes)")
    filler = rng.choice(FILLER, context - len(hidden) - len(TAIL))
    at = round(depth / 100 * len(filler))
    data = filler[:at].tobytes() + hidden + filler[at:].tobytes() + TAIL
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), at + hidden.index(str(digit).encode())


def prompts(context: int, depth: int, trials: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``trials`` prompts (trials, context) for one cell, their digits and needle positions; fixed by the seed."""
    rng = np.random.default_rng([seed, context, depth])
    digits = rng.integers(0, 10, trials)
    made = [prompt(context, depth, int(d), rng) for d in digits]
    return torch.stack([t for t, _ in made]), torch.from_numpy(digits), [p for _, p in made]


@torch.no_grad()
def retrieval(model, contexts: list[int], *, trials: int = 10, seed: int = 0, batch: int = 10,
              device: torch.device | None = None) -> dict:
    """Passkey accuracy per (context, depth) of ``model`` (a Hugging Face causal LM over bytes) with dense
    attention: the model runs in eval mode, where an lhcompile-applied model runs its dense graph."""
    device = device or next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    was_training = model.training
    model.eval()
    cells = {}
    with tqdm(total=len(contexts) * len(DEPTHS) * trials, desc="passkey", disable=None) as bar:
        for context in contexts:
            for depth in DEPTHS:
                tokens, digits, _ = prompts(context, depth, trials, seed)
                right = 0
                for start in range(0, trials, batch):
                    with autocast:
                        out = model(input_ids=tokens[start : start + batch].to(device), logits_to_keep=1)
                    guess = out.logits[:, -1, DIGITS].argmax(-1).cpu()
                    right += int((guess == digits[start : start + batch]).sum())
                    bar.update(len(guess))
                cells[f"{context},{depth}"] = right / trials
    model.train(was_training)
    return {"contexts": contexts, "depths": list(DEPTHS), "trials": trials, "seed": seed,
            "prompts": len(contexts) * len(DEPTHS) * trials, "chance": CHANCE, "accuracy": cells,
            "mean": float(np.mean(list(cells.values())))}


def heatmap(result: dict, path: Path, title: str = "") -> None:
    """Depth x context heatmap of a ``retrieval`` result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[result["accuracy"][f"{c},{d}"] for c in result["contexts"]] for d in result["depths"]])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result["contexts"]), 4))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(result["contexts"])), [f"{c // 1024}K" if c >= 1024 else str(c)
                                                   for c in result["contexts"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d}%" for d in result["depths"]])
    ax.set_xlabel("context")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{title}passkey retrieval {result['mean']:.2f} (chance {result['chance']:.1f}, "
                 f"{result['trials']} per cell)", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selection_view(model, config: lhcompile.LighthouseConfig, sites: list[int], context: int, out: Path,
                   seed: int = 0) -> dict:
    """For one passkey prompt (the middle depth), what each of ``sites`` selects in the Lighthouse stage: a PNG per
    site with the needle marked; returns the fraction of (site, head) pairs covering the needle per level."""
    tokens, _, needles = prompts(context, 50, 1, seed)
    device = next(model.parameters()).device
    found = lhcompile.selections(model, input_ids=tokens.to(device), config=config, sites=sites)
    for chosen in found.sites:
        found.plot(str(out / f"selection_site{chosen.site}.png"), site=chosen.site, mark=needles[0])
    return {"context": context, "needle": needles[0], "sites": [s.site for s in found.sites],
            "fraction_covering": {level: found.fraction_covering(needles[0], level)
                                  for level in range(config.levels)}}


def load(args):
    """The model of a train.py state (or an untrained one of --size), its size (train.Size) and training length."""
    import train  # the models of examples/train.py (which imports this module)

    if args.state:
        state = torch.load(Path(args.state) / "state.pt", map_location="cpu", weights_only=False)
        size_name, seq_len = state["config"]["size"], state["config"]["seq_len"]
    else:
        state, size_name = None, args.size
        seq_len = train.SIZES[size_name].seq_len
    size = train.SIZES[size_name]
    model = train.LlamaForCausalLM(train.model_config(size, seq_len, "sdpa"))
    if state is not None:
        model.load_state_dict(state["model"])
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), size, seq_len


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", help="a train.py state folder (state_<step>)")
    ap.add_argument("--size", default="tiny", help="without --state: an untrained model of this train.py size")
    ap.add_argument("--contexts", type=int, nargs="+", help="context lengths (default: the paper's up to the model's)")
    ap.add_argument("--trials", type=int, default=10, help="prompts per (context, depth) cell (default: 10)")
    ap.add_argument("--seed", type=int, default=0, help="the prompts' seed (default: 0)")
    ap.add_argument("--selection", help="comma-separated Lighthouse sites to picture for one prompt")
    ap.add_argument("--out", default="runs/passkey", help="folder for passkey.json and the PNGs")
    args = ap.parse_args(argv)
    model, size, seq_len = load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = retrieval(model, args.contexts or contexts_for(seq_len), trials=args.trials, seed=args.seed)
    if args.selection:
        sites = [int(s) for s in args.selection.split(",")]
        result["selection"] = selection_view(model, size.lighthouse, sites, seq_len, out, args.seed)
    (out / "passkey.json").write_text(json.dumps(result, indent=1))
    heatmap(result, out / "passkey.png")
    print(f"passkey retrieval {result['mean']:.3f} over {result['prompts']} prompts (chance {CHANCE}); "
          f"wrote {out / 'passkey.json'} and {out / 'passkey.png'}")
    if "selection" in result:
        view = result["selection"]
        print(f"selection at {view['context']} bytes, needle at {view['needle']}: fraction of (site, head) pairs "
              "covering it by level " + ", ".join(f"{lvl}: {f:.2f}" for lvl, f in view["fraction_covering"].items()))
    return result


if __name__ == "__main__":
    main()
