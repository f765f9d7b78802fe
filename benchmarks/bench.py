"""Time one Lighthouse attention layer against dense causal SDPA (cuDNN backend) on a CUDA GPU.

    python -m benchmarks.bench                      # N = 16K .. 1M, k = 2048 and 4096, plot in bench.png
    python -m benchmarks.bench --seq 131072 --topk 2048 --reps 10
    python -m benchmarks.bench --seq 65536 131072 --topk 2048 --rope   # also RoPE after selection (Rotary)
    python -m benchmarks.bench --documents          # packed documents at 128K: per document vs dense varlen/Flex

Prints forward and forward+backward medians (CUDA events, after warm-up), the speed-up over dense, and a
per-stage breakdown against each stage's floor (bytes over the measured copy bandwidth, or FLOPs over the
measured bf16 matmul rate); writes the numbers as JSON and a PNG of latency against context length.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lhcompile import Documents, LighthouseConfig, Rotary, api, lighthouse_attention
from lhcompile.operator import documents
from lhcompile.operator.documents import PLANNER

DENSE_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]


def median_ms(fn, reps: int) -> float:
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


def ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), measured on this GPU."""
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_s = median_ms(lambda: dst.copy_(src), 10) / 1e3
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_s = median_ms(lambda: a @ a, 10) / 1e3
    return 2 * src.numel() * 2 / copy_s, 2 * 8192**3 / mm_s


@dataclass
class Stage:
    name: str
    ms: float
    floor_ms: float


@dataclass
class Row:
    n: int
    topk: int
    dense_fwd: float | None
    dense_fwdbwd: float | None
    lh_fwd: float
    lh_fwdbwd: float
    stages: list[Stage] = field(default_factory=list)
    lh_rope_fwdbwd: float | None = None
    """Forward + backward with RoPE after selection (unrotated q, k and a rotate_half table), when asked for."""
    scorer: str = "norm"


def stage_breakdown(q, k, v, config: LighthouseConfig, reps: int, bandwidth: float, flops: float) -> list[Stage]:
    """Each stage of one forward and backward timed on its own, with its floor."""
    from lhcompile.operator import kernels
    from lhcompile.operator.scorers import SCORERS

    levels, p, n = config.levels, config.pooling_factor, q.shape[2]
    row_bytes = q.shape[0] * q.shape[1] * q.shape[3] * q.element_size()  # one position, all heads
    scorer = SCORERS[config.scorer]
    s_qk, s_kq = scorer.pyramids(q, k, v, config, None, None)
    geometry = config.geometry(n)
    index, inv = kernels.select(s_qk, s_kq, geometry)
    s = index.shape[2]
    gathered = [kernels.gather(t, index, inv, levels, p).requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(DENSE_BACKENDS):
        o = F.scaled_dot_product_attention(*gathered, is_causal=True)
    grad_out = torch.randn_like(q)
    grad_o = torch.randn_like(o)
    attn_flops = 2 * 2 * q.shape[0] * q.shape[1] * s * s * q.shape[3] / 2  # two matmuls, causal half

    def attention_backward():
        torch.autograd.grad(o, gathered, grad_o, retain_graph=True)

    def attention_forward():
        with sdpa_kernel(DENSE_BACKENDS), torch.no_grad():
            F.scaled_dot_product_attention(*gathered, is_causal=True)

    plan = [
        # the norm reads q and k once; the dilated scorer runs two causal attentions of N / dilation per class
        (f"score ({config.scorer})", lambda: scorer.pyramids(q, k, v, config, None, None),
         2 * n * row_bytes / bandwidth if config.scorer == "norm" else 2 * attn_flops * n * n / (s * s * config.dilation)
         / flops),
        ("select", lambda: kernels.select(s_qk, s_kq, geometry), 0.0),
        ("gather q,k,v", lambda: [kernels.gather(t, index, inv, levels, p) for t in (q, k, v)],
         3 * (n + s) * row_bytes / bandwidth),
        ("attention fwd", attention_forward, attn_flops / flops),
        ("scatter", lambda: kernels.scatter(o, index, inv, n, levels, p), (n + s) * row_bytes / bandwidth),
        ("scatter bwd", lambda: kernels.scatter_backward(grad_out, index, inv, levels, p),
         (n + s) * row_bytes / bandwidth),
        ("attention bwd", attention_backward, 2.5 * attn_flops / flops),
        ("gather bwd q,k,v",
         lambda: [kernels.gather_backward(grad_o, index, inv, n, t.shape[1], levels, p) for t in (q, k, v)],
         3 * (n + s) * row_bytes / bandwidth),
    ]
    return [Stage(name, median_ms(fn, reps), 1e3 * floor) for name, fn, floor in plan]


def bench(n: int, config: LighthouseConfig, *, reps: int, dense_reps: int, bandwidth: float, flops: float,
          heads: int = 8, dim: int = 128, rope: bool = False) -> Row:
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def dense():
        with sdpa_kernel(DENSE_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def light():
        return lighthouse_attention(q, k, v, config)

    def fwd(fn, r):
        with torch.no_grad():
            return median_ms(fn, r)

    def fwdbwd(fn, r):
        return median_ms(lambda: torch.autograd.grad(fn(), (q, k, v), grad), r)

    row = Row(n, config.topk, None, None, fwd(light, reps), fwdbwd(light, reps), scorer=config.scorer)
    if rope:
        angles = torch.arange(n, device="cuda").float().unsqueeze(-1) / 10000.0 ** (
            torch.arange(dim // 2, device="cuda") / (dim // 2))
        rotary = Rotary.of("rotate_half", *(torch.cat([f(angles)] * 2, -1).bfloat16() for f in (torch.cos, torch.sin)))
        after = dataclasses.replace(config, rope="after_selection")
        row.lh_rope_fwdbwd = fwdbwd(lambda: lighthouse_attention(q, k, v, after, rope=rotary), reps)
    if dense_reps:
        row.dense_fwd, row.dense_fwdbwd = fwd(dense, dense_reps), fwdbwd(dense, dense_reps)
    if n >= config.min_lighthouse_len:
        row.stages = stage_breakdown(q.detach(), k.detach(), v.detach(), config, reps, bandwidth, flops)
    return row


def lognormal(median: int, total: int = 131072, seed: int = 0) -> list[int]:
    """Document lengths as a corpus has them: lognormal (sigma 1) around ``median``, at least 16 tokens, seeded, the
    last one cut to fill ``total``."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(max(16, int(rng.lognormal(math.log(median), 1.0))))
    lengths[-1] -= sum(lengths) - total
    return lengths


MIXES = {
    "1 x 128K": [131072],
    "2 x 64K": [65536] * 2,
    "96K + 32 x 1K": [98304] + [1024] * 32,
    "16 x 8K": [8192] * 16,
    "128 x 1K": [1024] * 128,
    "lognormal ~1K": lognormal(1024),
    "lognormal ~3K": lognormal(3072),
    "lognormal ~8K": lognormal(8192),
}
"""The packed-document mixes of one 128K sequence: the five that the targets name (TARGETS.md), then documents of
random lengths around a median."""


class _Layer(torch.nn.Module):
    """One attention layer of a packed model (its own module, so that it is compiled on its own)."""

    def __init__(self, attention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, *args):
        return self.attention(*args)


class _Packed(torch.nn.Module):
    """A model of ``layers`` attention layers on the same packed batch (each adds its output to the queries of
    the next, so that every layer's backward runs), as torchtitan's models call their attention: its first layer
    finds the batch's documents, the later ones are handed the same."""

    def __init__(self, attention, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(attention) for _ in range(layers)])

    def forward(self, q, k, v, *documents):
        for layer in self.layers:
            q = q + layer(q, k, v, *documents)
        return q


def _varlen(q, k, v, cu, longest):
    """torchtitan's VarlenAttention: the tokens of a batch's rows laid end to end, documents by cumulative lengths
    and the longest one's length."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(-1, 0))


def _flex(q, k, v, block_mask):
    """torchtitan's FlexAttention: a document-causal block mask built outside the model."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask)


LAYERS = 4
"""Layers of the packed models that ``bench_documents`` times (besides one-layer models)."""


def bench_documents(config: LighthouseConfig, reps: int, mixes: list[str], heads: int = 8, dim: int = 128
                    ) -> list[dict]:
    """Per mix of ``mixes`` (names in MIXES): Lighthouse per document against the dense document-causal kernels on
    the same documents (flash varlen, compiled FlexAttention, lhcompile's document_attention), forward + backward
    ms: eagerly, compiled, and through the pass in varlen and FlexAttention models (what a model gets: a batch
    without a long document runs the model's own call, one of a document per row plain Lighthouse), beside the
    same models compiled without the pass. Each model call is a new batch whose first layer reads its documents:
    models of one layer time that layer, models of ``LAYERS`` layers give the later layers' time per layer (their
    difference over ``LAYERS - 1``); for one document also plain Lighthouse and cuDNN."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from torch.nn.attention.varlen import varlen_attn

    flex = torch.compile(flex_attention)
    # compiled once for every mix: the documents are data
    per_document = torch.compile(lambda q, k, v, s: lighthouse_attention(q, k, v, config, documents=Documents(s)))
    plain = torch.compile(lambda q, k, v: lighthouse_attention(q, k, v, config))
    models = {(kind, layers): _Packed(attention, layers) for kind, attention in (("varlen", _varlen), ("flex", _flex))
              for layers in (1, LAYERS)}
    # the same models compiled without the pass: what a model runs without lhcompile
    stock = {key: torch.compile(_Packed(model.layers[0].attention, key[1])) for key, model in models.items()}
    for model in models.values():
        # every site Lighthouse, which the default dense_layers (the first and last two sites) would keep dense
        api.apply(model, dataclasses.replace(config, dense_layers=()), compiler="inductor")
    rows = []
    for name in mixes:
        lengths = MIXES[name]
        n = sum(lengths)
        # the (B, N, H, d) -> (B, H, N, d) views a model hands its attention
        leaves = [torch.randn(1, n, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3)]
        q, k, v = (t.transpose(1, 2) for t in leaves)
        grad = torch.randn_like(q)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
        packed = Documents.from_cu_seqlens(cu, n)
        doc = packed.starts.long().cumsum(1)[0]
        block_mask = create_block_mask(lambda b, h, i, j: (doc[i] == doc[j]) & (i >= j), 1, None, n, n,
                                       device="cuda", _compile=True)
        rows_ = [t.detach()[0].requires_grad_() for t in leaves]  # varlen's (T, H, d)
        longest = max(lengths)
        rows_grad = grad[0].transpose(0, 1).contiguous()

        def fwdbwd(fn, inputs=leaves, g=grad):
            return median_ms(lambda: torch.autograd.grad(fn(), inputs, g), reps)

        before = {key: dict(api.inspect(m).variant_calls) for key, m in models.items()}
        inputs = {"varlen": ((*rows_, cu, longest), rows_, rows_grad), "flex": ((q, k, v, block_mask), leaves, grad)}

        def timed(runs: dict, kind: str, layers: int) -> float:
            args, wrt, g = inputs[kind]
            return fwdbwd(lambda: runs[(kind, layers)](*args), wrt, g)

        row = {"mix": name, "n": n,
               "lighthouse_documents": fwdbwd(lambda: lighthouse_attention(q, k, v, config, documents=packed)),
               "lighthouse_documents_compiled": fwdbwd(lambda: per_document(q, k, v, packed.starts)),
               "flash_varlen": fwdbwd(lambda: varlen_attn(*rows_, cu, cu, longest, longest, window_size=(-1, 0)),
                                      rows_, rows_grad),
               "flex": fwdbwd(lambda: flex(q, k, v, block_mask=block_mask)),
               "document_attention": fwdbwd(lambda: documents.document_attention(q, k, v, packed)),
               "cudnn_share": PLANNER.cudnn_share(lengths)}
        for kind in ("varlen", "flex"):
            for label, runs in (("pass", models), ("stock", stock)):
                first, deep = timed(runs, kind, 1), timed(runs, kind, LAYERS)
                # the first layer (it reads the documents), and each later layer (handed the same documents)
                row[f"{kind}_{label}_first"] = first
                row[f"{kind}_{label}_later"] = (deep - first) / (LAYERS - 1)
        # which graph the models ran for this batch (besides the rewritten one): lhcompile.document_probe's names
        for kind in ("varlen", "flex"):
            key = (kind, LAYERS)
            row[f"{kind}_graphs"] = sorted(name for name, count in api.inspect(models[key]).variant_calls.items()
                                           if count > before[key].get(name, 0))
        if len(lengths) == 1:
            row["lighthouse"] = fwdbwd(lambda: lighthouse_attention(q, k, v, config))
            row["lighthouse_compiled"] = fwdbwd(lambda: plain(q, k, v))
            with sdpa_kernel(DENSE_BACKENDS):
                row["cudnn"] = fwdbwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        rows.append(row)
        best = min(row["flash_varlen"], row["flex"], row["document_attention"], row.get("cudnn", float("inf")))
        extra = (f"  plain Lighthouse {row['lighthouse']:.2f}, compiled {row['lighthouse_compiled']:.2f}; cuDNN "
                 f"{row['cudnn']:.2f}") if "lighthouse" in row else ""
        models_ = " | ".join(
            f"{kind}: through the pass first {row[f'{kind}_pass_first']:7.2f} / later {row[f'{kind}_pass_later']:7.2f}"
            f", without it {row[f'{kind}_stock_first']:7.2f} / {row[f'{kind}_stock_later']:7.2f} "
            f"({row[f'{kind}_pass_first'] / row[f'{kind}_stock_first']:4.2f}x / "
            f"{row[f'{kind}_pass_later'] / row[f'{kind}_stock_later']:4.2f}x)" for kind in ("varlen", "flex"))
        print(f"{name:>14}  per document: eager {row['lighthouse_documents']:7.2f}, compiled "
              f"{row['lighthouse_documents_compiled']:7.2f} | {models_} | dense: flash varlen "
              f"{row['flash_varlen']:7.2f}, Flex {row['flex']:7.2f}, document_attention "
              f"{row['document_attention']:7.2f} | fastest dense / per document: {best / row['lighthouse_documents']:5.2f}x"
              f"{extra} | {len(lengths)} documents, cuDNN share {row['cudnn_share']:.2f}, graphs besides the "
              f"rewritten one: varlen {row['varlen_graphs']}, Flex {row['flex_graphs']}", flush=True)
        del q, k, v, leaves, rows_, block_mask
        torch.cuda.empty_cache()
    return rows


def plot(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = sorted({(r.n, r.dense_fwdbwd) for r in rows if r.dense_fwdbwd is not None})
    if dense:
        ax.plot(*zip(*dense), "o-", color="black", label="dense SDPA")
    for scorer, topk in sorted({(r.scorer, r.topk) for r in rows}):
        pts = [(r.n, r.lh_fwdbwd) for r in rows if (r.scorer, r.topk) == (scorer, topk)]
        ax.plot(*zip(*pts), "o-", label=f"Lighthouse k={topk}, {scorer} scorer")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length N (tokens)")
    ax.set_ylabel("forward + backward, ms (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[1 << s for s in range(14, 21)], help="context lengths N")
    ap.add_argument("--topk", type=int, nargs="+", default=[2048, 4096], help="top-k budgets k")
    ap.add_argument("--levels", type=int, default=3, help="pyramid levels L")
    ap.add_argument("--pooling-factor", type=int, default=4, help="pooling factor p")
    ap.add_argument("--reps", type=int, default=5, help="timed runs of Lighthouse (median)")
    ap.add_argument("--dense-reps", type=int, default=3, help="timed runs of dense SDPA (0 skips it)")
    ap.add_argument("--dense-max-seq", type=int, default=1 << 20, help="longest N at which to time dense SDPA")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True): bit-identical gradients for dense and Lighthouse "
                         "(PyTorch's SDPA then skips cuDNN, whose backward is not deterministic)")
    ap.add_argument("--rope", action="store_true",
                    help="also time Lighthouse with RoPE after selection (LighthouseConfig.rope, eager: its rotation is "
                         "unfused here, fused by Inductor in a compiled model)")
    ap.add_argument("--documents", action="store_true",
                    help="instead: packed documents of one 128K sequence (the mixes of MIXES), Lighthouse per document "
                         "against flash varlen and compiled FlexAttention on the same documents")
    ap.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES), metavar="MIX",
                    help=f"with --documents: the mixes to time (default all: {', '.join(repr(m) for m in MIXES)})")
    ap.add_argument("--cudnn-min-length", type=lambda s: None if s == "none" else int(s),
                    default=PLANNER.cudnn_min_length,
                    help="documents at least this long run on cuDNN in lhcompile.document_attention, the others on "
                         "flash varlen ('none': flash for all)")
    ap.add_argument("--scorers", nargs="+", default=["norm"], help="scorers to time (LighthouseConfig.scorer)")
    ap.add_argument("--dilation", type=int, default=4, help="the dilated scorer's dilation")
    ap.add_argument("--json", default="bench.json", help="where to write the numbers")
    ap.add_argument("--plot", default="bench.png", help="where to write the latency plot")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("lhcompile.bench times CUDA kernels; no CUDA device is visible")

    bandwidth, flops = ceilings()
    torch.use_deterministic_algorithms(args.deterministic)
    title = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B=1 H=8 d=128 bf16 causal, "
             f"L{args.levels} p{args.pooling_factor}{', deterministic mode' if args.deterministic else ''}")
    print(f"{title}; median of {args.reps} (dense: {args.dense_reps}), ms")
    print(f"measured ceilings: copy {bandwidth / 1e12:.2f} TB/s (read+write), bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    PLANNER.cudnn_min_length = args.cudnn_min_length  # this process's kernel choice, for the runs that follow
    if args.documents:
        config = LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=args.topk[0])
        print(f"packed documents, N=131072, k={config.topk}: forward + backward ms")
        rows = bench_documents(config, args.reps, args.mixes)
        with open(args.json, "w") as f:
            json.dump({"title": title, "documents": rows}, f, indent=1)
        return
    rows = []
    dense_cache: dict[int, tuple[float | None, float | None]] = {}
    for scorer, topk in itertools.product(args.scorers, args.topk):
        config = LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=topk, scorer=scorer,
                                  dilation=args.dilation)
        print(f"\nk={topk}, {scorer} scorer (Lighthouse below N={config.min_lighthouse_len} is dense SDPA)")
        print(f"{'N':>8} {'dense fwd':>10} {'LH fwd':>8} {'fwd x':>7} {'dense f+b':>10} {'LH f+b':>8} {'f+b x':>7}")
        for n in args.seq:
            dense_reps = args.dense_reps if n <= args.dense_max_seq and n not in dense_cache else 0
            row = bench(n, config, reps=args.reps, dense_reps=dense_reps, bandwidth=bandwidth, flops=flops,
                        rope=args.rope)
            if dense_reps:
                dense_cache[n] = (row.dense_fwd, row.dense_fwdbwd)
            row.dense_fwd, row.dense_fwdbwd = dense_cache.get(n, (None, None))
            rows.append(row)

            def ratio(a, b):
                return f"{a / b:>6.2f}x" if a else f"{'-':>7}"

            fmt = lambda x: f"{x:>10.2f}" if x else f"{'-':>10}"  # noqa: E731
            rope = (f"  RoPE after selection f+b {row.lh_rope_fwdbwd:.2f} ({row.lh_rope_fwdbwd / row.lh_fwdbwd:.2f}x "
                    "LH's)") if row.lh_rope_fwdbwd else ""
            print(f"{n:>8} {fmt(row.dense_fwd)} {row.lh_fwd:>8.2f} {ratio(row.dense_fwd, row.lh_fwd)} "
                  f"{fmt(row.dense_fwdbwd)} {row.lh_fwdbwd:>8.2f} {ratio(row.dense_fwdbwd, row.lh_fwdbwd)}{rope}")
    print("\nper-stage breakdown (ms; floor = bytes / copy bandwidth, or attention FLOPs / matmul rate)")
    for row in rows:
        if row.stages:
            parts = "  ".join(f"{s.name} {s.ms:.2f}/{s.floor_ms:.2f}" for s in row.stages)
            total, floor = sum(s.ms for s in row.stages), sum(s.floor_ms for s in row.stages)
            print(f"N={row.n} k={row.topk}: sum {total:.2f} floor {floor:.2f} | {parts}")
    with open(args.json, "w") as f:
        json.dump({"title": title, "bandwidth": bandwidth, "flops": flops, "rows": [asdict(r) for r in rows]}, f, indent=1)
    plot(rows, args.plot, title)
    print(f"\nwrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
