"""Kernel-level comparison of the attention backends on one GPU (Llama-3-8B heads: 32 query,
8 KV, head size 128, bf16): decode steps replayed as CUDA graphs (batch 1/32/256, context
1k/8k) and prefill chunks (512 and 2048 tokens, with no and with a 4k cached prefix), each
against the ceilings measured in the same run (copy bandwidth, bf16 matmul TFLOP/s).

    python benchmarks/attention_backends.py --backends triton flashinfer flash_attn --out X.json
    python benchmarks/attention_backends.py --backends triton --fp8 --out X.json

--fp8 adds, for triton, the same cases over an fp8 (e4m3fn) cache, read through each of the
kernels' fp8 conversions (kernels.FP8_CONVERSION), and a sweep of the fp8 decode tile / warps
and prefill block rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
from triton.testing import do_bench

from loom import ops
from loom.plugin_manager import get_plugin_manager
from loom.testing.attention_cases import build_metadata, random_cache, random_qkv

H, KVH, D, DT = 32, 8, 128, torch.bfloat16
DECODE = [(b, c) for b in (1, 32, 256) for c in (1024, 8192)]
PREFILL = [(chunk, prefix, seqs) for chunk, seqs in ((512, 8), (2048, 2)) for prefix in (0, 4096)]


def ceilings(dev) -> dict:
    x = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=5, rep=50)
    a = torch.randn(8192, 8192, dtype=DT, device=dev)
    mm = do_bench(lambda: a @ a, warmup=5, rep=30)
    return {"copy_GBps": round(2 * x.numel() / ms / 1e6), "matmul_TFLOPs": round(2 * 8192 ** 3 / mm / 1e9)}


def make(cls, dev):
    return cls(H, KVH, D, D ** -0.5, DT, dev)


def block_size(cls) -> int:
    return cls.required_block_size or 16


CACHE_DTYPE = DT     # the benchmark's KV cache dtype (DT, or float8_e4m3fn with --fp8)


def inputs(cls, batch, dev):
    md, nb = build_metadata(batch, block_size(cls), dev)
    cache = random_cache(cls.kv_cache_shape(nb, block_size(cls), KVH, D), DT, dev)
    cache = cache.to(CACHE_DTYPE)
    q, k, v = (t.contiguous() for t in random_qkv(md.num_tokens, H, KVH, D, DT, dev))
    return md, cache, q, k, v


def decode_us(cls, batch, ctx, dev) -> float:
    backend = make(cls, dev)
    md, cache, q, k, v = inputs(cls, [(ctx - 1, 1)] * batch, dev)
    step = dataclasses.replace(md)
    graph_md = backend.build_graph_metadata(md)
    backend.plan_replay(graph_md, step)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        backend.forward(q, k, v, cache, graph_md)
        with torch.cuda.graph(graph, stream=stream):
            backend.forward(q, k, v, cache, graph_md)
    torch.cuda.current_stream().wait_stream(stream)
    return do_bench(graph.replay, warmup=10, rep=50) * 1e3


def prefill_us(cls, chunk, prefix, seqs, dev) -> tuple[float, float]:
    """(kernel time, host planning time of build_metadata), in microseconds."""
    backend = make(cls, dev)
    md, cache, q, k, v = inputs(cls, [(prefix, chunk)] * seqs, dev)
    planned = backend.build_metadata(md)
    t0 = time.perf_counter()
    for _ in range(20):
        backend.build_metadata(md)
    torch.cuda.synchronize()
    plan_us = (time.perf_counter() - t0) / 20 * 1e6
    return do_bench(lambda: backend.forward(q, k, v, cache, planned), warmup=10, rep=50) * 1e3, plan_us


def fp8_sweep(pm, dev, copy_gbps, prefill: bool = True) -> list[dict]:
    """Triton over an fp8 cache (fp16 conversion): decode tile x warps, prefill block rows."""
    from loom.plugins.attention.triton import backend as B
    cls = pm.get("attention_backend", "triton")
    set_kv("fp8-fp16")
    rows = []
    default = B.DECODE_TILE[1], B.DECODE_WARPS[1], B.DECODE_STAGES[1], B.PREFILL_BLOCK_M[1]
    for tile, warps, stages in ((128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 4, 5), (64, 2, 4),
                                (64, 4, 4), (128, 2, 4), (256, 8, 3), (64, 1, 4), (128, 8, 4)):
        B.DECODE_TILE[1], B.DECODE_WARPS[1], B.DECODE_STAGES[1] = tile, warps, stages
        for batch, ctx in ((1, 1024), (32, 8192), (256, 1024), (256, 2048), (256, 8192)):
            us = decode_us(cls, batch, ctx, dev)
            gbs = batch * ctx * KVH * D * 2 / us / 1e3
            rows.append(dict(backend="triton", kv="fp8-fp16", kind="decode-sweep", tile=tile,
                             warps=warps, stages=stages, batch=batch, context=ctx, us=round(us, 1),
                             of_copy=round(gbs / copy_gbps, 3)))
            print(json.dumps(rows[-1]), flush=True)
    for block_m in (64, 128) if prefill else ():
        B.PREFILL_BLOCK_M[1] = block_m
        for chunk, prefix, seqs in PREFILL:
            us, _ = prefill_us(cls, chunk, prefix, seqs, dev)
            tf = seqs * 4 * H * D * (prefix * chunk + chunk * (chunk + 1) // 2) / us / 1e6
            rows.append(dict(backend="triton", kv="fp8-fp16", kind="prefill-sweep",
                             block_m=block_m, chunk=chunk, prefix=prefix, seqs=seqs,
                             us=round(us, 1), TFLOPs=round(tf)))
            print(json.dumps(rows[-1]), flush=True)
    B.DECODE_TILE[1], B.DECODE_WARPS[1], B.DECODE_STAGES[1], B.PREFILL_BLOCK_M[1] = default
    return rows


def set_kv(kv: str) -> None:
    """The cache dtype and, for fp8, the triton kernels' conversion of variant ``kv``."""
    global CACHE_DTYPE
    CACHE_DTYPE = DT if kv == "bf16" else torch.float8_e4m3fn
    if kv != "bf16":
        from loom.plugins.attention.triton import kernels
        kernels.FP8_CONVERSION = kv.removeprefix("fp8-")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["triton", "flashinfer", "flash_attn"])
    ap.add_argument("--decode-sweep-only", action="store_true",
                    help="only the fp8 decode sweep")
    ap.add_argument("--fp8", action="store_true",
                    help="also triton over an fp8 cache, with each fp8 conversion")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    pm = get_plugin_manager()
    ops.use(pm.fused_ops("auto", pm.platform()))       # the graph-safe KV write
    result = {"device": torch.cuda.get_device_name(), "heads": [H, KVH, D], "dtype": "bf16",
              "ceilings": ceilings(dev), "rows": []}
    print(json.dumps(result["ceilings"]), flush=True)
    variants = [] if args.decode_sweep_only else [(name, "bf16") for name in args.backends]
    if args.fp8 and not args.decode_sweep_only:
        variants += [("triton", f"fp8-{c}") for c in ("fp16", "cast")]
    for name, kv in variants:
        cls = pm.get("attention_backend", name)
        if getattr(cls, "unavailable", None):
            print(f"{name}: {cls.unavailable}", file=sys.stderr)
            continue
        set_kv(kv)
        t0 = time.time()
        for batch, ctx in DECODE:
            us = decode_us(cls, batch, ctx, dev)
            gbs = batch * ctx * KVH * D * 2 * CACHE_DTYPE.itemsize / us / 1e3
            row = dict(backend=name, kv=kv, kind="decode", batch=batch, context=ctx, us=round(us, 1),
                       GBps=round(gbs), of_copy=round(gbs / result["ceilings"]["copy_GBps"], 3))
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        for chunk, prefix, seqs in PREFILL:
            us, plan_us = prefill_us(cls, chunk, prefix, seqs, dev)
            flops = seqs * 4 * H * D * (prefix * chunk + chunk * (chunk + 1) // 2)
            tf = flops / us / 1e6
            row = dict(backend=name, kv=kv, kind="prefill", chunk=chunk, prefix=prefix, seqs=seqs,
                       us=round(us, 1), plan_us=round(plan_us, 1), TFLOPs=round(tf),
                       of_matmul=round(tf / result["ceilings"]["matmul_TFLOPs"], 3))
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        print(f"{name} {kv}: {time.time() - t0:.0f} s (compiles included)", flush=True)
    if args.fp8 or args.decode_sweep_only:
        result["rows"] += fp8_sweep(pm, dev, result["ceilings"]["copy_GBps"],
                                    prefill=not args.decode_sweep_only)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
