"""Lighthouse training with FSDP2 and context parallelism over W processes, launched with torchrun.

    torchrun --nproc-per-node 2 examples/train_cp.py --paper --seq-len 131072     # CP=2 on 2 GPUs
    torchrun --nproc-per-node 1 examples/train_cp.py --paper --seq-len 131072     # CP=1: same model, same tokens
    torchrun --nproc-per-node 4 examples/train_cp.py --paper --seq-len 1048576 --checkpointing
    torchrun --nproc-per-node 4 examples/train_cp.py --paper --seq-len 262144 --checkpointing --dense
    torchrun --nproc-per-node 2 examples/train_cp.py                               # small, CPU (gloo) if no GPU

Every sequence is cut into 2W chunks and rank r holds chunks r and 2W-1-r (PyTorch's head-tail layout, from
``lhcompile.context_parallel.shard``) of the token ids, labels and position ids. Parameters are sharded with
``fully_shard`` over the same ranks: each decoder layer, then the root, as torchtitan does (``--wrap root`` shards
only the root). ``lhcompile.apply(..., context_parallel=group)`` makes each Lighthouse site
select per chunk and join PyTorch's ring attention with its gathered tokens, and every dense site ring attention
(``--dense``: every site, the dense baseline). ``--checkpointing`` recomputes each decoder layer in the backward
pass (Hugging Face's gradient checkpointing, inside each layer's FSDP2 unit): the selection is recomputed inside
the checkpointed layer, identically. Prints the loss, the global and per-GPU tokens/s and the peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaForCausalLM

import lhcompile
from lhcompile.context_parallel import shard

sys.path.insert(0, str(Path(__file__).parent))
import train  # noqa: E402
from corpus import Batches, python_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1024,
                    help="whole sequence; each rank holds seq-len / W tokens (default: 1024)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default: 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first, compilation (default: 2)")
    ap.add_argument("--paper", action="store_true", help="the paper's 530M-class dimensions (GPU); else the tiny ones")
    ap.add_argument("--compiler", choices=["inductor", "eager"], default=None,
                    help="inductor (default on GPU) or eager (default on CPU)")
    ap.add_argument("--lr", type=float, default=3e-4, help="constant learning rate (default: 3e-4)")
    ap.add_argument("--wrap", choices=["layers", "root"], default="layers",
                    help="fully_shard each decoder layer and the root (default), or the root only")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every decoder layer")
    ap.add_argument("--dense", action="store_true", help="the baseline: every site dense ring attention")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    size = train.SIZES["paper" if args.paper else "tiny"]
    model = LlamaForCausalLM(train.model_config(size, args.seq_len, "causal_sdpa")).to(device=device, dtype=dtype)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.model.layers if args.wrap == "layers" else []:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    # --dense: every layer kept dense, so every site is ring attention
    config = dataclasses.replace(size.lighthouse, dense_layers=tuple(range(size.layers))) if args.dense else size.lighthouse
    lhcompile.apply(model, config, compiler=args.compiler or ("inductor" if cuda else "eager"),
                    context_parallel=dist.group.WORLD)

    batches = iter(Batches(python_corpus().train, 1, args.seq_len + 1, seed=0))  # the same on every rank
    positions = torch.arange(args.seq_len, device=device)[None]
    start, tokens = None, 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        ids = next(batches).to(device)
        local = model(input_ids=shard(ids[:, :-1], rank, world, dim=1), position_ids=shard(positions, rank, world, dim=1))
        loss = F.cross_entropy(local.logits.flatten(0, 1).float(), shard(ids[:, 1:], rank, world, dim=1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_reduce(shown := loss.detach().clone(), op=dist.ReduceOp.AVG)
        tokens += args.seq_len if step >= args.warmup else 0
        if rank == 0:
            print(f"step {step}: loss {shown.item():.4f}", flush=True)
    if cuda:
        torch.cuda.synchronize()
    rate = tokens / (time.perf_counter() - start)
    if rank == 0:
        print(lhcompile.inspect(model))
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB per GPU" if cuda else ""
        print(f"CP={world}, N={args.seq_len}, {'dense' if args.dense else 'Lighthouse'}"
              f"{', checkpointing' if args.checkpointing else ''}: {rate:.0f} tokens/s in all, "
              f"{rate / world:.0f} per GPU{peak}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
