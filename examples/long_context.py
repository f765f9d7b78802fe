"""The longest context one device trains: first step (compilation included), steady step, tokens/s, peak memory.

    python examples/long_context.py --seq-len 131072 1048576                 # paper dims, one GPU
    python examples/long_context.py --size tiny --seq-len 512 1024 --steps 1 # a look on CPU

A Hugging Face Llama at the chosen size (``examples/train.py``'s SIZES: the paper's 30 layers, d 1024, 8 heads x
128 by default), bf16 on a GPU, AdamW, gradient checkpointing on every layer, random bytes, batch 1. Per length it
runs Lighthouse with the size's dense layers (the paper's first two and last two) and with none
(``dense_layers=()``), or dense attention everywhere (``--arms dense``: ``model.compile()``). ``apply``
compiles each kind of layer once (its default, ``regional=True``; ``--whole``: the whole model as one graph).
Inductor's caches are off, so that every first step is a cold start. A length that runs out of memory is
reported as such and the next one runs. Writes one JSON entry per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

import lhcompile

sys.path.insert(0, str(Path(__file__).parent))
import train  # noqa: E402


def run(n: int, dense_layers: tuple[int, ...] | None, args, device: torch.device) -> dict:
    """One model at length n: Lighthouse with ``dense_layers``, or dense attention everywhere (None)."""
    torch.manual_seed(0)
    size = train.SIZES[args.size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(train.model_config(size, n, "causal_sdpa")).to(device=device, dtype=dtype)
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if dense_layers is None:
        model.compile()
    else:
        lhcompile.apply(model, dataclasses.replace(size.lighthouse, dense_layers=dense_layers),
                        regional=not args.whole)
    tokens = torch.randint(0, train.VOCAB, (1, n + 1), device=device)

    def step() -> float:
        start = time.perf_counter()
        logits = model(input_ids=tokens[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[0, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = step()
    steady = min(step() for _ in range(args.steps))
    rewritten = None if dense_layers is None else len(lhcompile.inspect(model).rewritten)
    return {"n": n, "dense_layers": "all" if dense_layers is None else list(dense_layers),
            "compile": "dense model.compile()" if dense_layers is None else "whole" if args.whole else "by layer",
            "first_step_s": round(first, 2), "steady_step_s": round(steady, 3), "tokens_per_s": round(n / steady),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
            "sites_rewritten": rewritten, "layers": size.layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    ap.add_argument("--size", choices=list(train.SIZES), default="paper", help="model size (default: paper)")
    ap.add_argument("--arms", nargs="+", choices=["paper", "none", "dense"], default=["paper", "none"],
                    help="paper: the size's dense layers; none: every layer Lighthouse; dense: dense attention")
    ap.add_argument("--steps", type=int, default=2, help="steady steps after the first; the fastest counts")
    ap.add_argument("--whole", action="store_true", help="compile the whole model as one graph (regional=False)")
    ap.add_argument("--out", default="long-context.json", help="JSON file, one entry per run")
    args = ap.parse_args()
    torch._inductor.config.force_disable_caches = True  # every first step compiles from nothing: a cold start
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = train.SIZES[args.size]
    arms = {"paper": size.lighthouse.dense_layers, "none": (), "dense": None}
    entries = []
    print(f"{'N':>8} {'dense layers':>14} {'first step s':>13} {'steady s':>9} {'tok/s':>9} {'peak GiB':>9}")
    for n in args.seq_len:
        for arm in args.arms:
            try:
                entry = run(n, arms[arm], args, device)
            except torch.OutOfMemoryError:
                entry = {"n": n, "dense_layers": arm, "error": "out of memory"}
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            entries.append(entry)
            if "error" in entry:
                print(f"{n:>8} {arm:>14} out of memory", flush=True)
                continue
            print(f"{n:>8} {str(entry['dense_layers']):>14} {entry['first_step_s']:>13.1f} "
                  f"{entry['steady_step_s']:>9.2f} {entry['tokens_per_s']:>9} {entry['peak_gib'] or 0:>9.1f}", flush=True)
            Path(args.out).write_text(json.dumps(entries, indent=1))


if __name__ == "__main__":
    main()
