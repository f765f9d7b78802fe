"""End-to-end training throughput: the Lighthouse stage against the dense model, one GPU.

    python examples/throughput.py --seq-len 32768 65536          # the paper's model dims, bf16, AdamW

Both models come from the same Hugging Face LlamaConfig and seed and are compiled with Inductor (dense:
``model.compile()``; Lighthouse: ``lhcompile.apply``). Both use attn_implementation="causal_sdpa" (SDPA with
is_causal=True and no mask; see lhcompile/integrations/hf.py), or with ``--attention sdpa`` transformers' own, whose mask
Dynamo builds inside the graph (N x N): lhcompile proves it causal, so its dense layers run is_causal=True too.
With ``--packed`` the sequences are packed documents (``corpus.PackedBatches``: a directory's source files make a
document, position ids restart with each) and both models keep them apart with causal_sdpa: dense attention within
each document against Lighthouse per document. Prints tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

import lhcompile

sys.path.insert(0, str(Path(__file__).parent))
import train  # noqa: E402
from corpus import Batches, PackedBatches, python_corpus  # noqa: E402


def tokens_per_second(mode: str, seq_len: int, args, data) -> tuple[float, float, str]:
    """Training tokens/s of the dense model ("dense") or of the Lighthouse one with scorer ``mode``."""
    torch.manual_seed(0)
    size = train.SIZES[args.size]
    model = LlamaForCausalLM(train.model_config(size, seq_len, args.attention)).to(device="cuda", dtype=torch.bfloat16)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if mode == "dense":
        model.compile()
    else:
        lhcompile.apply(model, dataclasses.replace(size.lighthouse, scorer=mode))
    if args.packed:
        batches = (tuple(t.cuda() for t in batch) for batch in PackedBatches(data.train, data.documents, 1,
                                                                               seq_len + 1, seed=0))
    else:
        batches = ((batch.cuda(), None) for batch in Batches(data.train, 1, seq_len + 1, seed=0))

    def step():
        tokens, positions = next(batches)
        loss = train.loss_of(model, tokens, positions)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    rate = args.steps * seq_len / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    # a layer's site appears once per graph captured (packed batches recapture at a new length): count layers
    report = lhcompile.inspect(model)
    sites = "" if mode == "dense" else (f"{len({s.module_path for s in report.rewritten})} of "
                                        f"{len({s.module_path for s in report})} layers rewritten, "
                                        f"{report.graphs} graphs captured")
    return rate, peak, sites


def measure(mode: str, seq_len: int, args, data) -> tuple[float, float, str]:
    result = tokens_per_second(mode, seq_len, args, data)
    torch._dynamo.reset()  # drop the compiled model before the next one is built
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[32768, 65536],
                    help="context lengths to time (default: 32768 65536)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps, batch 1 (default: 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation (default: 3)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing (both models)")
    ap.add_argument("--attention", choices=["causal_sdpa", "sdpa"], default="causal_sdpa",
                    help="Hugging Face attention of both models (default: causal_sdpa)")
    ap.add_argument("--packed", action="store_true",
                    help="packed documents (a directory's files each), kept apart by both models")
    ap.add_argument("--scorers", nargs="+", default=["norm"], help="Lighthouse scorers to time (default: norm)")
    ap.add_argument("--size", choices=list(train.SIZES), default="paper",
                    help="model dims and Lighthouse setting, examples/train.py's presets (default: paper)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("throughput.py measures CUDA training steps; no CUDA device is visible")
    data = python_corpus()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.size} dims, attention {args.attention}, "
          f"bf16, AdamW, batch 1, {args.steps} timed steps after {args.warmup}")
    if args.packed:
        need = train.SIZES[args.size].lighthouse.min_lighthouse_len
        for n in args.seq_len:
            batches = PackedBatches(data.train, data.documents, 1, n + 1, seed=0)
            lengths = [torch.diff(torch.cat([(p == 0).nonzero()[:, 1], torch.tensor([n + 1])]))
                       for _, p in (batches[i] for i in range(args.warmup + args.steps))]
            lengths = torch.cat(lengths)
            print(f"packed documents at N={n}: {lengths.numel() / (args.warmup + args.steps):.1f} per sequence, "
                  f"{lengths[lengths >= need].sum() / lengths.sum():.0%} of tokens in documents of at least "
                  f"min_lighthouse_len={need}")
    print(f"{'N':>7} {'dense tok/s':>12} {'peak GiB':>9} {'Lighthouse tok/s':>17} {'peak GiB':>9} {'speed-up':>9}")
    for n in args.seq_len:
        dense, dense_mem, _ = measure("dense", n, args, data)
        for scorer in args.scorers:
            light, light_mem, sites = measure(scorer, n, args, data)
            print(f"{n:>7} {dense:>12.0f} {dense_mem:>9.1f} {light:>17.0f} {light_mem:>9.1f} {light / dense:>8.2f}x  "
                  f"({scorer} scorer; {sites})", flush=True)


if __name__ == "__main__":
    main()
