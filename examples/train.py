"""Two-stage long-context pre-training with lhcompile: a Lighthouse stage, then dense recovery.

A Llama-3-style decoder (Hugging Face LlamaConfig, random init, byte vocabulary) learns Python source (every
.py file of this interpreter, see corpus.py). Stage 1 runs with ``lhcompile.apply``; stage 2 calls
``lhcompile.restore`` and goes on with dense SDPA from the same weights and optimizer state. The recipe is the
paper's: linear warm-up over a fixed number of steps, then a constant learning rate through the switch; fp32
master weights with bf16 autocast on a GPU; AdamW (0.9, 0.95), weight decay 0.1, gradient clipping 1.

    python examples/train.py                        # tiny model on CPU (a few minutes); the 'quality' size on a GPU
    python examples/train.py --dense                # the dense-from-scratch baseline: same seed, same batches
    python examples/train.py --steps 6000 --switch-at 6000 --stop-at 4200 --save-at 1400,2800,4200 --out runs/lh
    python examples/train.py --resume runs/lh/state_2800 --steps 4000 --switch-at 2800 --out runs/two_stage_4000

Since the learning rate is constant after warm-up and batch i depends on (seed, i) alone, a run of H steps is
the first H steps of any longer run: ``--save-at`` keeps resumable states (weights, optimizer, scheduler, step,
RNG, the switch done or not, every history) and ``--resume`` continues one bit for bit, also with another
horizon or switch step (a two-stage run branched from a Lighthouse run). Batches are built by DataLoader workers
off the training thread, with a bounded number of CPU threads per run, so that runs side by side on one
machine (one per GPU) do not slow each other.

Held-out loss is measured with dense attention (eval mode) every --eval-every steps, at the switch, at every
saved state and at the end: overall, by position bucket, and on copy positions by distance to the earlier copy
(corpus.copies: the in-context retrieval measure). A Lighthouse layer's loss is not measured: its selection
reads the norms of later tokens of the same tile, so it is no causal language-model loss (docs/algorithm.md).
Wall clock counts training steps only: compilation (a warm-up step per stage) and evaluation are timed apart.
Writes summary.json and loss.png to --out (and the final weights as a Hugging Face checkpoint with --save).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import lhcompile
import lhcompile.integrations.hf  # noqa: F401  (registers attn_implementation="causal_sdpa")
from corpus import VOCAB, Batches, copies, python_corpus
from passkey import contexts_for, heatmap, retrieval


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
    warmup: int
    lr: float
    lighthouse: lhcompile.LighthouseConfig
    eval_every: int
    eval_batches: int


SIZES = {
    # CPU: a few minutes; L3 p2 k32 in tiles of 16, so that a 512-byte sequence is long enough for Lighthouse
    "tiny": Size(4, 128, 4, 2, 256, 512, 4, 300, 30, 3e-3,
                 lhcompile.LighthouseConfig(levels=3, pooling_factor=2, topk=32, tile_budget=16, dense_layers=(0, -1)),
                 eval_every=30, eval_batches=2),
    # the quality experiment (BENCHMARKS.md): 21.4M parameters, 32K bytes, the paper's k1536-at-98K sparsity
    # scaled by a third (4 tiles of 8192 tokens, S/N = 18.75%); 2 of 12 layers dense. Warm-up: 200 steps at
    # every horizon (the 2000-step runs' 10%), so that the horizon moves neither the schedule nor the transition
    "quality": Size(12, 384, 3, 3, 1024, 32768, 2, 2000, 200, 2e-3,
                    lhcompile.LighthouseConfig(levels=3, pooling_factor=4, topk=512, dense_layers=(0, -1)),
                    eval_every=100, eval_batches=8),
    # the paper's 530M-class model (d_model 1024, 30 layers, 8 heads x 128, FFN 1536), L3 p4 k2048
    "paper": Size(30, 1024, 8, 8, 1536, 65536, 1, 16000, 1000, 1e-3,
                  lhcompile.LighthouseConfig(levels=3, pooling_factor=4, topk=2048, dense_layers=(0, 1, -2, -1)),
                  eval_every=500, eval_batches=8),
}


def model_config(size: Size, seq_len: int, attention: str = "sdpa") -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads, intermediate_size=size.ffn, max_position_embeddings=seq_len,
        rope_theta=500000.0, attn_implementation=attention, use_cache=False, tie_word_embeddings=False,
    )


def buckets(seq_len: int) -> list[tuple[int, int]]:
    """Position (or distance) buckets: 0-1K, 1-4K, 4-16K, 16-32K at 32K, the same fractions at other lengths."""
    edges = [0, seq_len // 32, seq_len // 8, seq_len // 2, seq_len]
    return list(zip(edges[:-1], edges[1:]))


def bucket_name(lo: int, hi: int) -> str:
    short = lambda x: f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x)  # noqa: E731
    return f"{short(lo)}-{short(hi)}"


def loss_of(model, batch: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Next-byte cross-entropy; ``positions`` (packed documents) are the batch's position ids."""
    logits = model(input_ids=batch[:, :-1], position_ids=None if positions is None else positions[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


class Evaluator:
    """Held-out loss with dense attention on fixed held-out batches: overall, by position bucket, and on copy
    positions by distance to the earlier copy (the retrieval measure, corpus.copies)."""

    def __init__(self, held: torch.Tensor, args, device: torch.device, autocast) -> None:
        self.device, self.autocast, self.seq_len = device, autocast, args.seq_len
        data = Batches(held, args.batch, args.seq_len + 1, seed=1234)
        self.batches = [data[i] for i in range(args.eval_batches)]
        # per sequence: which predictions continue an earlier span, at which distance bucket (-1: none)
        self.distance_bucket = torch.full((len(self.batches) * args.batch, args.seq_len), -1, dtype=torch.long)
        for row, seq in enumerate(torch.cat(self.batches)):
            found = copies(seq)
            for i, (lo, hi) in enumerate(buckets(args.seq_len)):
                inside = (found.distances >= lo) & (found.distances < hi)
                self.distance_bucket[row, found.positions[inside]] = i

    def __call__(self, model) -> dict:
        model.eval()
        losses, hits = [], []
        with torch.no_grad():
            for batch in self.batches:
                with self.autocast():  # sliced on the device, as in training: the same strides reuse the graph
                    logits = model(input_ids=batch.to(self.device)[:, :-1]).logits.float()
                target = batch[:, 1:].to(self.device)
                losses.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none").cpu())
                hits.append((logits.argmax(-1) == target).cpu())
        model.train()
        loss, hit = torch.cat(losses), torch.cat(hits)
        per_position = loss.mean(0)
        result = {"loss": per_position.mean().item(),
                  "buckets": {bucket_name(lo, hi): per_position[lo:hi].mean().item()
                              for lo, hi in buckets(self.seq_len)}}
        copied = {}
        for i, (lo, hi) in enumerate(buckets(self.seq_len)):
            at = self.distance_bucket == i
            copied[bucket_name(lo, hi)] = {"loss": loss[at].mean().item() if at.any() else None,
                                           "accuracy": hit[at].float().mean().item() if at.any() else None,
                                           "positions": int(at.sum())}
        result["copy"] = copied
        return result


def _layers(text: str) -> tuple[int, ...]:
    return () if text == "none" else tuple(int(i) for i in text.split(","))


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default=None,
                    help="model and budget preset (default: quality on a GPU, tiny on CPU)")
    ap.add_argument("--steps", type=int, help="the horizon: optimizer steps in all (default: the size's)")
    ap.add_argument("--recovery", type=float, default=0.3,
                    help="share of the steps run dense after the switch (default: 0.3)")
    ap.add_argument("--switch-at", type=int,
                    help="step of the switch to dense (default: from --recovery; --steps: never)")
    ap.add_argument("--stop-at", type=int, help="stop after this step, saving a state (default: --steps)")
    ap.add_argument("--save-at", default="", help="comma-separated steps at which to save a resumable state")
    ap.add_argument("--resume", help="a state folder (state_<step>) to continue from, bit for bit")
    ap.add_argument("--dense", action="store_true", help="baseline: dense SDPA for all steps (no lhcompile.apply)")
    ap.add_argument("--with-dense", action="store_true",
                    help="then the dense baseline too (same seed, same batches, in --out/dense), both in loss.png")
    ap.add_argument("--rope", choices=["before_pooling", "after_selection"], default="before_pooling",
                    help="where Lighthouse rotates q and k: the paper's order, or after selection (default: "
                         "before_pooling; see LighthouseConfig.rope)")
    ap.add_argument("--scorer", choices=["norm", "dilated"], default=None,
                    help="Lighthouse scorer (default: the size's, norm); dilated with the paper's dilation of 4")
    ap.add_argument("--dense-layers", type=_layers, default=None,
                    help="layers kept dense in the Lighthouse stage, comma-separated, 'none' for every layer "
                         "Lighthouse (default: the size's, e.g. 0,-1)")
    ap.add_argument("--seq-len", type=int, help="bytes per sequence (default: the size's)")
    ap.add_argument("--batch", type=int, help="sequences per step (default: the size's)")
    ap.add_argument("--lr", type=float, help="peak learning rate, held constant after warm-up (default: the size's)")
    ap.add_argument("--warmup", type=int, help="steps of linear learning-rate warm-up (default: the size's)")
    ap.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default: the size's)")
    ap.add_argument("--eval-batches", type=int, help="held-out batches per evaluation (default: the size's)")
    ap.add_argument("--compiler", choices=["inductor", "eager"], default=None,
                    help="inductor (default on a GPU) or eager (default on CPU)")
    ap.add_argument("--attention", choices=["sdpa", "causal_sdpa"], default=None,
                    help="HF attention: stock sdpa, or causal_sdpa (no N x N mask; default on a GPU, see lhcompile/integrations/hf.py)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers building batches (default: 2 on a GPU, 1 on CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads of the training process (default: 4 on a GPU, torch's own on CPU)")
    ap.add_argument("--seed", type=int, default=0, help="weights and batch order (default: 0)")
    ap.add_argument("--passkey-trials", type=int, default=10,
                    help="passkey prompts per (context, depth) at the end of the run, dense attention (0: none)")
    ap.add_argument("--out", default="runs/train", help="folder for summary.json, loss.png, states (default: runs/train)")
    ap.add_argument("--save", action=argparse.BooleanOptionalAction, default=False,
                    help="write the final weights as a Hugging Face checkpoint (default: no)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.size = args.size or ("quality" if cuda else "tiny")
    size = SIZES[args.size]
    for name in ("steps", "seq_len", "batch", "lr", "warmup", "eval_every", "eval_batches"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(size, name))
    args.compiler = args.compiler or ("inductor" if cuda else "eager")
    args.attention = args.attention or ("causal_sdpa" if cuda else "sdpa")
    args.workers = (2 if cuda else 1) if args.workers is None else args.workers
    args.threads = args.threads or (4 if cuda else None)
    if args.dense:
        args.switch_at = 0
    elif args.switch_at is None:
        args.switch_at = round(args.steps * (1 - args.recovery))
    args.stop_at = min(args.stop_at or args.steps, args.steps)
    args.save_at = sorted({int(s) for s in args.save_at.split(",") if s})
    return args


class Run:
    """Everything a training run carries from step to step, saved whole by ``save`` and continued by ``load``."""

    def __init__(self, args, device: torch.device) -> None:
        size = SIZES[args.size]
        torch.manual_seed(args.seed)
        self.model = LlamaForCausalLM(model_config(size, args.seq_len, args.attention)).to(device)  # fp32 master
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                     fused=device.type == "cuda")
        warmup = max(1, args.warmup)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warmup))
        self.step = 0
        self.lighthouse_steps = 0  # steps trained with Lighthouse attention
        self.switched = False
        self.train: list[tuple[int, float]] = []
        self.heldout: list[dict] = []
        self.timers = {"train_s": 0.0, "compile_s": 0.0, "eval_s": 0.0}
        self.config = {k: getattr(args, k) for k in ("size", "seed", "seq_len", "batch", "lr", "warmup", "attention",
                                                     "rope")}

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                    "step": self.step, "lighthouse_steps": self.lighthouse_steps, "switched": self.switched,
                    "train": self.train, "heldout": self.heldout, "timers": self.timers, "rng": rng,
                    "config": self.config}, folder / "state.pt")

    def load(self, folder: Path) -> None:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        if state["config"] != self.config:
            raise SystemExit(f"train.py --resume {folder}: it was trained with {state['config']}, not {self.config}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.step, self.lighthouse_steps, self.switched = state["step"], state["lighthouse_steps"], state["switched"]
        self.train, self.heldout, self.timers = state["train"], state["heldout"], state["timers"]
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def batches_from(step: int, args, data: torch.Tensor, device: torch.device):
    """Batches step, step+1, ... built ahead by DataLoader workers (one CPU thread each), pinned on a GPU."""
    dataset = Batches(data, args.batch, args.seq_len + 1, args.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(step, args.stop_at), num_workers=args.workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if args.workers else None,
        worker_init_fn=_one_thread if args.workers else None)
    return iter(loader)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    size = SIZES[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    corpus = python_corpus()
    run = Run(args, device)
    if args.resume:
        run.load(Path(args.resume))
    evaluator = Evaluator(corpus.heldout, args, device, autocast)
    name = "dense" if args.dense else ("lighthouse" if args.switch_at >= args.steps else "two_stage")
    params = sum(p.numel() for p in run.model.parameters())
    print(corpus.describe())
    print(f"{name}: {params / 1e6:.1f}M parameters, steps {run.step}..{args.stop_at} of {args.steps} x {args.batch} x "
          f"{args.seq_len} bytes" + ("" if args.dense else f", switch to dense at step {args.switch_at}"))
    out = Path(args.out)
    summary: dict = {"run": name, "size": args.size, "seed": args.seed, "rope": args.rope,
                     "scorer": None if args.dense else (args.scorer or size.lighthouse.scorer), "parameters": params,
                     "steps": args.steps, "tokens_per_step": args.batch * args.seq_len, "switch_step": args.switch_at,
                     "warmup": args.warmup, "corpus": corpus.describe(), "resumed_from": args.resume}

    def compile_stage() -> None:
        """Put the model in its stage's form, then compile it with one untimed step on held-out data (no update)."""
        lighthouse = not run.switched and run.step < args.switch_at
        if lighthouse:
            dense_layers = size.lighthouse.dense_layers if args.dense_layers is None else args.dense_layers
            stage = dataclasses.replace(size.lighthouse, rope=args.rope, dense_layers=dense_layers,
                                        scorer=args.scorer or size.lighthouse.scorer)
            lhcompile.apply(run.model, stage, compiler=args.compiler)
        elif args.compiler != "eager":
            run.model.compile(backend=args.compiler)
        start = time.perf_counter()
        with autocast():
            loss_of(run.model, evaluator.batches[0].to(device)).backward()
        run.opt.zero_grad(set_to_none=True)
        synchronize(device)
        run.timers["compile_s"] += time.perf_counter() - start

    def report_sites() -> None:
        summary["report"] = str(lhcompile.inspect(run.model))
        summary["lighthouse_sites"] = len(lhcompile.inspect(run.model).rewritten)
        tqdm.write(summary["report"])

    def switch() -> None:
        report_sites()
        lhcompile.restore(run.model)  # stage 2: dense recovery, same weights and optimizer state
        run.switched = True
        compile_stage()

    pending: list[torch.Tensor] = []  # losses stay on the device between evaluations: no sync per step

    def evaluate() -> None:
        synchronize(device)
        start = time.perf_counter()
        run.train.extend(zip(range(run.step - len(pending), run.step), torch.stack(pending).tolist()) if pending else [])
        pending.clear()
        if not run.heldout or run.heldout[-1]["step"] != run.step:
            point = {"step": run.step, "tokens": run.step * args.batch * args.seq_len, "train_s": run.timers["train_s"],
                     "lighthouse_steps": run.lighthouse_steps, **evaluator(run.model)}
            run.heldout.append(point)
            bar.set_postfix(train=f"{run.train[-1][1]:.3f}" if run.train else "-", heldout=f"{point['loss']:.3f}")
            if bar.disable:  # a log file rather than a terminal: one line per evaluation
                print(f"{name} step {run.step}: held-out {point['loss']:.4f}, training {run.timers['train_s']:.1f} s",
                      flush=True)
        run.timers["eval_s"] += time.perf_counter() - start

    if not args.dense and not run.switched and run.step >= args.switch_at:
        run.switched = True  # resumed at (or after) its switch from a Lighthouse run's state: dense from here
    compile_stage()
    bar = tqdm(total=args.stop_at, initial=run.step, desc=name, dynamic_ncols=True, disable=None)
    batches = batches_from(run.step, args, corpus.train, device)
    clock = time.perf_counter()
    while True:
        at_switch = not args.dense and not run.switched and run.step >= args.switch_at
        if run.step % args.eval_every == 0 or at_switch or run.step in args.save_at or run.step == args.stop_at:
            run.timers["train_s"] += time.perf_counter() - clock
            evaluate()
            if at_switch:
                switch()
            if run.step in args.save_at or run.step == args.stop_at:
                run.save(out / f"state_{run.step}")
            clock = time.perf_counter()
        if run.step == args.stop_at:
            break
        batch = next(batches).to(device, non_blocking=True)
        with autocast():
            loss = loss_of(run.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        run.lighthouse_steps += not args.dense and not run.switched
        run.step += 1
        bar.update()
    bar.close()
    if not args.dense and not run.switched:
        report_sites()  # a Lighthouse run stopped before its switch
    final = run.heldout[-1]
    summary.update(lighthouse_steps=run.lighthouse_steps, train=run.train, heldout=run.heldout,
                   final_step=run.step, final_heldout_loss=final["loss"], final_buckets=final["buckets"],
                   final_copy=final["copy"], tokens=run.step * args.batch * args.seq_len, **run.timers)
    print(f"{name}: held-out loss {final['loss']:.4f} at step {run.step} (dense attention); copy loss by distance "
          + ", ".join(f"{k} {v['loss']:.3f}" for k, v in final["copy"].items() if v["loss"] is not None)
          + f"; training {run.timers['train_s']:.0f} s + compile {run.timers['compile_s']:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    if args.passkey_trials:  # the paper's retrieval test (examples/passkey.py), on the same prompts for every run
        start = time.perf_counter()
        summary["passkey"] = retrieval(run.model, contexts_for(args.seq_len), trials=args.passkey_trials)
        heatmap(summary["passkey"], out / "passkey.png", title=f"{name}, step {run.step}: ")
        print(f"{name}: passkey retrieval {summary['passkey']['mean']:.3f} over {summary['passkey']['prompts']} prompts "
              f"(chance 0.1), {time.perf_counter() - start:.0f} s")
    plot_losses({name: summary}, out / "loss.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.with_dense and not args.dense:
        given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--with-dense"]
        baseline = main([*given, "--dense", "--out", str(out / "dense")])
        plot_losses({name: summary, "dense": baseline}, out / "loss.png")
    if args.save:
        run.model.save_pretrained(out / "checkpoint")
    print(f"wrote {out / 'loss.png'}, {out / 'summary.json'} and the resumable state {out / f'state_{run.step}'}"
          + (f" and {out / 'checkpoint'}" if args.save else ""))
    return {"model": run.model, **summary, "checkpoint": out / "checkpoint"}


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
        (line,) = ax.plot(*zip(*run["train"]), lw=0.6, alpha=0.6, label=f"{name}: train") if run["train"] else ax.plot([])
        points = run["heldout"]
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], "o-", ms=3, color=line.get_color(),
                label=f"{name}: held-out (dense attention)")
        if 0 < run["lighthouse_steps"] < run["final_step"]:
            ax.axvline(run["lighthouse_steps"], color="k", ls="--", lw=1, label="restore: Lighthouse → dense")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
