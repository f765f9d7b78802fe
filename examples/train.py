"""Two-stage long-context pre-training with lhcompile: a Lighthouse stage, then dense recovery.

A Llama-3-style decoder (Hugging Face LlamaConfig, random init, byte vocabulary) learns Python source (every
.py file of this interpreter, see corpus.py) with a key-value retrieval probe mixed in. Stage 1 runs with
``lhcompile.apply``; stage 2 calls ``lhcompile.restore`` and goes on with dense SDPA from the same weights and
optimizer state. The recipe is the paper's: linear warm-up, then a constant learning rate through the switch;
fp32 master weights with bf16 autocast on a GPU; AdamW (0.9, 0.95), weight decay 0.1, gradient clipping 1.

    python examples/train.py                        # tiny model on CPU (a few minutes); the 'quality' size on a GPU
    python examples/train.py --dense                # the dense-from-scratch baseline: same seed, same batches
    python examples/train.py --size paper --seq-len 65536 --steps 16000

Held-out loss is measured with dense attention (eval mode) every --eval-every steps and at the switch, overall
and by position bucket; at the switch also with Lighthouse attention (the spike the restore has to recover
from). At the switch and at the end the retrieval probe is scored on held-out text with fresh keys. Wall clock
counts training steps only: compilation (a warm-up step per stage) and evaluation are timed apart.
Writes summary.json, loss.png and the checkpoint to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import lhcompile
import lhcompile.hf  # noqa: F401  (registers attn_implementation="causal_sdpa")
from corpus import DIGIT_IDS, DIGITS, VOCAB, Probe, python_corpus, sequences


@dataclass(frozen=True)
class Size:
    """A model, its training length and budget, and the Lighthouse setting that goes with it."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    lighthouse: lhcompile.LighthouseConfig
    probe: Probe
    eval_every: int
    eval_batches: int
    probe_batches: int


SIZES = {
    # CPU: a few minutes; L3 p2 k32 in tiles of 16, so that a 512-byte sequence is long enough for Lighthouse
    "tiny": Size(4, 128, 4, 2, 256, 512, 4, 300, 3e-3,
                 lhcompile.LighthouseConfig(levels=3, pooling_factor=2, topk=32, tile_budget=16, dense_layers=(0, -1)),
                 Probe(keys=2, queries=1, tail=64), eval_every=30, eval_batches=2, probe_batches=4),
    # the quality experiment (BENCHMARKS.md): 21.4M parameters, 32K bytes, the paper's k1536-at-98K sparsity
    # scaled by a third (4 tiles of 8192 tokens, S/N = 18.75%); 2 of 12 layers dense
    "quality": Size(12, 384, 3, 3, 1024, 32768, 2, 2000, 2e-3,
                    lhcompile.LighthouseConfig(levels=3, pooling_factor=4, topk=512, dense_layers=(0, -1)),
                    Probe(keys=8, queries=4, tail=1024), eval_every=100, eval_batches=8, probe_batches=32),
    # the paper's 530M-class model (d_model 1024, 30 layers, 8 heads x 128, FFN 1536), L3 p4 k2048
    "paper": Size(30, 1024, 8, 8, 1536, 65536, 1, 16000, 1e-3,
                  lhcompile.LighthouseConfig(levels=3, pooling_factor=4, topk=2048, dense_layers=(0, 1, -2, -1)),
                  Probe(keys=8, queries=4, tail=1024), eval_every=500, eval_batches=8, probe_batches=16),
}


def model_config(size: Size, seq_len: int, attention: str = "sdpa") -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads, intermediate_size=size.ffn, max_position_embeddings=seq_len,
        rope_theta=500000.0, attn_implementation=attention, use_cache=False, tie_word_embeddings=False,
    )


def buckets(seq_len: int) -> list[tuple[int, int]]:
    """Position buckets: 0-1K, 1-4K, 4-16K, 16-32K at 32K, the same fractions at other lengths."""
    edges = [0, seq_len // 32, seq_len // 8, seq_len // 2, seq_len]
    return list(zip(edges[:-1], edges[1:]))


def bucket_name(lo: int, hi: int) -> str:
    short = lambda x: f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x)  # noqa: E731
    return f"{short(lo)}-{short(hi)}"


def loss_of(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


class Evaluator:
    """Held-out loss by position bucket, and probe accuracy by distance, on fixed held-out batches."""

    def __init__(self, held: torch.Tensor, size: Size, args, device: torch.device, autocast) -> None:
        self.device, self.autocast, self.seq_len = device, autocast, args.seq_len
        stream = sequences(held, args.batch, args.seq_len + 1, torch.Generator().manual_seed(1234))
        self.plain = [next(stream)[0] for _ in range(args.eval_batches)]
        probes = sequences(held, args.batch, args.seq_len + 1, torch.Generator().manual_seed(4321), size.probe)
        self.probed = [next(probes) for _ in range(args.probe_batches)]

    def _logits(self, model, batch: torch.Tensor) -> torch.Tensor:
        with self.autocast():  # sliced on the device, as in training: the same strides reuse the compiled graph
            return model(input_ids=batch.to(self.device)[:, :-1]).logits.float()

    def loss(self, model, *, lighthouse: bool = False) -> dict:
        """Mean held-out loss, overall and per bucket; dense attention unless ``lighthouse`` (train mode, whose
        compiled graph is the training step's own: no new compilation)."""
        model.train(lighthouse)
        per_position = torch.zeros(self.seq_len, device=self.device)
        with torch.enable_grad() if lighthouse else torch.no_grad():
            for batch in self.plain:
                logits = self._logits(model, batch)
                target = batch[:, 1:].to(self.device)
                per_position += F.cross_entropy(logits.transpose(1, 2), target, reduction="none").detach().sum(0)
        model.train()
        per_position /= len(self.plain) * self.plain[0].shape[0]
        result = {"loss": per_position.mean().item()}
        result["buckets"] = {bucket_name(lo, hi): per_position[lo:hi].mean().item() for lo, hi in buckets(self.seq_len)}
        return result

    @torch.no_grad()
    def probe(self, model) -> dict:
        """Per-digit accuracy (argmax among the ten digits, teacher-forced; chance 10%) and exact match of the
        five-digit answers, overall and by key-to-query distance bucket (dense attention)."""
        model.eval()
        hits, distances = [], []
        for batch, answers in self.probed:
            logits = self._logits(model, batch)
            for row, where in enumerate(answers):
                at = where.digit_at[:, None] + torch.arange(DIGITS)  # (queries, digits) positions of the digits
                scores = logits[row, (at - 1).to(self.device)][..., DIGIT_IDS.to(self.device)].cpu()
                hits.append(DIGIT_IDS[scores.argmax(-1)] == batch[row, at])
                distances.append(where.distance)
        model.train()
        hits, distances = torch.cat(hits), torch.cat(distances)

        def scores(mask: torch.Tensor) -> dict:
            h = hits[mask]
            if not len(h):
                return {"per_digit": None, "exact": None, "queries": 0}
            return {"per_digit": h.float().mean().item(), "exact": h.all(-1).float().mean().item(), "queries": len(h)}

        result = scores(torch.ones_like(distances, dtype=torch.bool))
        result["by_distance"] = {bucket_name(lo, hi): scores((distances >= lo) & (distances < hi))
                                 for lo, hi in buckets(self.seq_len)}
        return result


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default=None,
                    help="model and budget preset (default: quality on a GPU, tiny on CPU)")
    ap.add_argument("--steps", type=int, help="optimizer steps in all (default: the size's)")
    ap.add_argument("--recovery", type=float, default=0.3, help="share of the steps run dense after the switch")
    ap.add_argument("--dense", action="store_true", help="baseline: dense SDPA for all steps (no lhcompile.apply)")
    ap.add_argument("--seq-len", type=int, help="bytes per sequence (default: the size's)")
    ap.add_argument("--batch", type=int, help="sequences per step (default: the size's)")
    ap.add_argument("--lr", type=float, help="peak learning rate, held constant after warm-up (default: the size's)")
    ap.add_argument("--warmup", type=float, default=0.1, help="share of the steps of linear learning-rate warm-up")
    ap.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default: the size's)")
    ap.add_argument("--eval-batches", type=int, help="held-out batches per evaluation (default: the size's)")
    ap.add_argument("--probe-batches", type=int, help="held-out probe batches (default: the size's)")
    ap.add_argument("--compiler", choices=["inductor", "eager"], default=None,
                    help="inductor (default on a GPU) or eager (default on CPU)")
    ap.add_argument("--attention", choices=["sdpa", "causal_sdpa"], default=None,
                    help="HF attention: stock sdpa, or causal_sdpa (no N x N mask; default on a GPU, see lhcompile/hf.py)")
    ap.add_argument("--seed", type=int, default=0, help="weights and batch order")
    ap.add_argument("--out", default="runs/train", help="directory for summary.json, loss.png and the checkpoint")
    ap.add_argument("--save", action=argparse.BooleanOptionalAction, default=True, help="write the checkpoint")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.size = args.size or ("quality" if cuda else "tiny")
    size = SIZES[args.size]
    for name in ("steps", "seq_len", "batch", "lr", "eval_every", "eval_batches", "probe_batches"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(size, name))
    args.compiler = args.compiler or ("inductor" if cuda else "eager")
    args.attention = args.attention or ("causal_sdpa" if cuda else "sdpa")
    args.switch_at = round(args.steps * (1 - args.recovery))  # the two-stage run's switch: both runs evaluate there
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    size = SIZES[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    corpus = python_corpus()
    print(corpus.describe())
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(size, args.seq_len, args.attention)).to(device)  # fp32 master weights
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    warmup = max(1, round(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    stream = sequences(corpus.train, args.batch, args.seq_len + 1, torch.Generator().manual_seed(args.seed), size.probe)
    evaluator = Evaluator(corpus.heldout, size, args, device, autocast)
    name = "dense" if args.dense else "two_stage"
    print(f"{name}: {params / 1e6:.1f}M parameters, {args.steps} steps x {args.batch} x {args.seq_len} bytes"
          + ("" if args.dense else f", Lighthouse for {args.switch_at} then dense"))

    def compile_stage(lighthouse: bool) -> float:
        """Put the model in the stage's form, then compile it with one untimed step on held-out data (no update)."""
        if lighthouse:
            lhcompile.apply(model, size.lighthouse, compiler=args.compiler)
        elif args.compiler != "eager":
            model.compile(backend=args.compiler)
        start = time.perf_counter()
        with autocast():
            loss_of(model, evaluator.plain[0].to(device)).backward()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    compile_s = compile_stage(lighthouse=not args.dense)
    train_s = eval_s = 0.0
    history: list[tuple[int, float]] = []
    heldout: list[dict] = []
    summary: dict = {"run": name, "size": args.size, "parameters": params, "steps": args.steps,
                     "tokens_per_step": args.batch * args.seq_len, "switch_step": args.switch_at,
                     "lighthouse_steps": 0 if args.dense else args.switch_at, "corpus": corpus.describe()}
    pending: list[torch.Tensor] = []  # losses stay on the device between evaluations: no sync per step

    def evaluate(step: int) -> None:
        nonlocal eval_s
        synchronize(device)
        start = time.perf_counter()
        history.extend(zip(range(step - len(pending), step), torch.stack(pending).tolist()) if pending else [])
        pending.clear()
        point = {"step": step, "tokens": step * args.batch * args.seq_len, "train_s": train_s, **evaluator.loss(model)}
        if step == args.switch_at:
            if not args.dense:
                point["lighthouse_loss"] = evaluator.loss(model, lighthouse=True)["loss"]
            summary["probe_at_switch"] = evaluator.probe(model)
        heldout.append(point)
        eval_s += time.perf_counter() - start
        bar.set_postfix(train=f"{history[-1][1]:.3f}" if history else "-", heldout=f"{point['loss']:.3f}")

    bar = tqdm(range(args.steps), desc="dense" if args.dense else "stage 1 lighthouse", dynamic_ncols=True)
    clock = time.perf_counter()
    for step in bar:
        if step % args.eval_every == 0 or step == args.switch_at:
            train_s += time.perf_counter() - clock
            evaluate(step)
            if step == args.switch_at and not args.dense:
                summary["report"] = str(lhcompile.inspect(model))
                summary["lighthouse_sites"] = len(lhcompile.inspect(model).rewritten)
                tqdm.write(summary["report"])
                lhcompile.restore(model)  # stage 2: dense recovery, same weights and optimizer state
                compile_s += compile_stage(lighthouse=False)
                bar.set_description("stage 2 dense")
            clock = time.perf_counter()
        batch = next(stream)[0]
        if device.type == "cuda":  # pinned: the copy does not wait for the steps queued before it
            batch = batch.pin_memory().to(device, non_blocking=True)
        with autocast():
            loss = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        pending.append(loss.detach())
    synchronize(device)
    train_s += time.perf_counter() - clock
    evaluate(args.steps)
    summary.update(train=history, heldout=heldout, final_heldout_loss=heldout[-1]["loss"],
                   final_buckets=heldout[-1]["buckets"], probe=evaluator.probe(model), train_s=train_s,
                   compile_s=compile_s, eval_s=eval_s, tokens=args.steps * args.batch * args.seq_len)
    probe = summary["probe"]
    print(f"{name}: held-out loss {summary['final_heldout_loss']:.4f} (dense attention); probe {probe['per_digit']:.0%} "
          f"per digit, {probe['exact']:.0%} exact; training {train_s:.0f} s + compile {compile_s:.0f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_losses({name: summary}, out / "loss.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.save:
        model.save_pretrained(out / "checkpoint")
    print(f"wrote {out / 'loss.png'} and {out / 'summary.json'}" + (f" and {out / 'checkpoint'}" if args.save else ""))
    return {"model": model, **summary, "checkpoint": out / "checkpoint"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plot_losses(runs: dict[str, dict], path: Path) -> None:
    """Training and held-out loss of each run (name -> summary) against step, with the switch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        (line,) = ax.plot(*zip(*run["train"]), lw=0.6, alpha=0.6, label=f"{name}: train")
        points = run["heldout"]
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], "o-", ms=3, color=line.get_color(),
                label=f"{name}: held-out (dense attention)")
        if run["lighthouse_steps"]:
            ax.axvline(run["lighthouse_steps"], color="k", ls="--", lw=1, label="restore: Lighthouse → dense")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
