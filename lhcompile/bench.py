"""Time one Lighthouse attention layer against dense causal SDPA (cuDNN backend) on a CUDA GPU.

    python -m lhcompile.bench --seq 32768 131072 --topk 2048

Prints forward and forward+backward medians (CUDA events, after warm-up) and the speed-up over dense.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import LighthouseConfig
from .ops import lighthouse_attention


def _median_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def bench(n: int, config: LighthouseConfig, *, heads: int = 8, dim: int = 128, reps: int = 5) -> dict[str, float]:
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def dense():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def light():
        return lighthouse_attention(q, k, v, config)

    row = {}
    for name, fn in (("dense", dense), ("lighthouse", light)):
        with torch.no_grad():
            row[f"{name}_fwd"] = _median_ms(fn, reps)
        row[f"{name}_fwdbwd"] = _median_ms(lambda: torch.autograd.grad(fn(), (q, k, v), grad), reps)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--pooling-factor", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    config = LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=args.topk)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  B=1 H=8 d=128 bf16 causal  "
          f"L{config.levels} p{config.pooling_factor} k{config.topk}  median of {args.reps}, ms")
    print(f"{'N':>8} {'dense fwd':>10} {'LH fwd':>8} {'dense f+b':>10} {'LH f+b':>8} {'f+b speed-up':>13}")
    for n in args.seq:
        r = bench(n, config, reps=args.reps)
        print(f"{n:>8} {r['dense_fwd']:>10.2f} {r['lighthouse_fwd']:>8.2f} {r['dense_fwdbwd']:>10.2f} "
              f"{r['lighthouse_fwdbwd']:>8.2f} {r['dense_fwdbwd'] / r['lighthouse_fwdbwd']:>12.2f}x")


if __name__ == "__main__":
    main()
