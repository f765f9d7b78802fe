"""Two-stage long-context pre-training with lhcompile: Lighthouse stage, then dense recovery.

A Llama-3-style decoder (Hugging Face LlamaConfig, random init, byte-level vocabulary) is trained on the
Python standard library's own source files. Stage 1 runs with ``lhcompile.apply``; stage 2 calls
``lhcompile.restore`` and resumes dense SDPA from the same optimizer state. Held-out loss is always
measured with dense attention (eval mode). Defaults are small enough for a CPU in a few minutes.

    python examples/train.py                      # CPU-sized default
    python examples/train.py --dense              # the dense-from-scratch baseline: same seed, same tokens
    python examples/train.py --paper --attention causal_sdpa --seq-len 65536 --steps 10000 --recovery-steps 6000

At the end a passkey probe (a digit hidden at several depths in filler text, read off the last position's
logits) reports retrieval accuracy; loss history, held-out losses and passkey accuracy go to summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import lhcompile
import lhcompile.hf  # noqa: F401  (registers attn_implementation="causal_sdpa")

SPECIALS = 3  # byte-level vocabulary: 256 bytes + <bos>, <eos>, <pad>


def stdlib_corpus(holdout: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """The running interpreter's standard-library sources as bytes; every 20th file is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        (held if i % round(1 / holdout) == 0 else train).extend(path.read_bytes())
    return torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(held, dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=generator)
        yield torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])


def model_config(args: argparse.Namespace) -> LlamaConfig:
    dims = dict(hidden_size=1024, num_hidden_layers=30, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1536)
    if not args.paper:
        dims = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    return LlamaConfig(
        vocab_size=256 + SPECIALS, max_position_embeddings=args.seq_len, rope_theta=500000.0,
        attn_implementation=getattr(args, "attention", "sdpa"), use_cache=False, tie_word_embeddings=False, **dims,
    )


def lighthouse_config(args: argparse.Namespace) -> lhcompile.LighthouseConfig:
    if args.paper:
        return lhcompile.LighthouseConfig(levels=3, pooling_factor=4, topk=2048, dense_layers=(0, 1, -2, -1))
    return lhcompile.LighthouseConfig(levels=3, pooling_factor=2, topk=32, tile_budget=16, dense_layers=(0, -1))


@torch.no_grad()
def heldout_loss(model, data, args, device) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    it = batches(data, args.batch, args.seq_len, gen)
    losses = [loss_of(model, next(it).to(device)).item() for _ in range(args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = b"What is the pass key? The pass key is "


@torch.no_grad()
def passkey_accuracy(model, seq_len: int, device, *, depths: int = 5, trials: int = 4, seed: int = 0) -> float:
    """Share of prompts where the hidden digit is the top digit at the last position (dense attention).

    Each prompt is filler text of about seq_len bytes with "The pass key is D. Remember it. D is the pass
    key." inserted at a depth of 5%..95%, ending with a question whose answer is the next byte.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    digits = torch.arange(ord("0"), ord("9") + 1, device=device)
    hits = total = 0
    for depth in torch.linspace(0.05, 0.95, depths).tolist():
        for _ in range(trials):
            d = int(torch.randint(0, 10, (), generator=gen))
            needle = f"The pass key is {d}. Remember it. {d} is the pass key. ".encode()
            room = seq_len - len(needle) - len(QUESTION)
            haystack = (FILLER * (room // len(FILLER) + 1))[:room]
            at = int(depth * room)
            prompt = haystack[:at] + needle + haystack[at:] + QUESTION
            ids = torch.tensor(list(prompt), device=device)[None]
            logits = model(input_ids=ids).logits[0, -1]
            hits += int(digits[logits[digits].argmax()] == ord(str(d)))
            total += 1
    model.train()
    return hits / total


def loss_of(model, batch):
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="Lighthouse (stage 1) steps")
    ap.add_argument("--recovery-steps", type=int, default=30, help="dense (stage 2) steps")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--paper", action="store_true", help="the paper's 530M-class dimensions (GPU)")
    ap.add_argument("--compiler", default=None, help="inductor (default on GPU) or eager (default on CPU)")
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--out", default="runs/train", help="directory for the loss plot and the checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention", choices=["sdpa", "causal_sdpa"], default="sdpa",
                    help="HF attention: stock sdpa, or causal_sdpa (no N x N mask; for long contexts, see lhcompile/hf.py)")
    ap.add_argument("--dense", action="store_true", help="baseline: dense SDPA for all steps (no lhcompile.apply)")
    ap.add_argument("--passkey-trials", type=int, default=4, help="passkey prompts per depth (5 depths)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compiler = args.compiler or ("inductor" if device.type == "cuda" else "eager")
    torch.manual_seed(args.seed)
    train, held = stdlib_corpus()
    print(f"corpus: {train.numel() / 1e6:.1f} MB train, {held.numel() / 1e6:.2f} MB held out (Python {sys.version.split()[0]} stdlib)")

    model = LlamaForCausalLM(model_config(args)).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    total = args.steps + args.recovery_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / total)))
    stream = batches(train, args.batch, args.seq_len, torch.Generator().manual_seed(args.seed))

    if args.dense:
        if compiler != "eager":
            model.compile(backend=compiler)
    else:
        lhcompile.apply(model, lighthouse_config(args), compiler=compiler)
    history: list[tuple[int, float]] = []
    heldout: list[tuple[int, float]] = []
    bar = tqdm(range(total), desc="dense baseline" if args.dense else "stage 1 lighthouse", dynamic_ncols=True)
    tokens, start = 0, time.perf_counter()
    for step in bar:
        if step == args.steps and not args.dense:
            heldout.append((step, heldout_loss(model, held, args, device)))
            print(f"\n{lhcompile.inspect(model)}")
            lhcompile.restore(model)  # stage 2: dense recovery, same weights and optimizer state
            if compiler != "eager":
                model.compile(backend=compiler)
            bar.set_description("stage 2 dense")
            tokens, start = 0, time.perf_counter()
        loss = loss_of(model, next(stream).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += args.batch * args.seq_len
        history.append((step, loss.item()))
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    heldout.append((total, heldout_loss(model, held, args, device)))
    passkey = passkey_accuracy(model, args.seq_len, device, trials=args.passkey_trials, seed=args.seed)
    print(f"held-out loss (dense attention): {', '.join(f'step {s} {l:.4f}' for s, l in heldout)}; "
          f"passkey accuracy {passkey:.0%}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "dense" if args.dense else "lighthouse → dense"
    plot_losses({name: (history, heldout)}, None if args.dense else args.steps, out / "loss.png")
    model.save_pretrained(out / "checkpoint")
    summary = {"dense": args.dense, "train": history, "heldout": heldout, "passkey": passkey,
               "tokens_per_step": args.batch * args.seq_len}
    (out / "summary.json").write_text(json.dumps(summary))
    print(f"wrote {out / 'loss.png'}, {out / 'summary.json'} and {out / 'checkpoint'}")
    return {"model": model, **summary, "checkpoint": out / "checkpoint"}


def plot_losses(curves: dict[str, tuple[list, list]], switch: int | None, path: Path) -> None:
    """Train and held-out loss of each named run (name -> (history, heldout)), with the switch step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (history, heldout) in curves.items():
        (line,) = ax.plot(*zip(*history), lw=1, label=f"{name}: train")
        ax.plot(*zip(*heldout), "o--", color=line.get_color(), label=f"{name}: held-out (dense attention)")
    if switch is not None:
        ax.axvline(switch, color="k", ls="--", lw=1, label="restore: Lighthouse → dense")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
