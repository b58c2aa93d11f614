"""Benchmark the triton attention backend on the GPU: decode (graph replay) and prefill."""
import json, sys, time
import torch
from triton.testing import do_bench
sys.path.insert(0, "tests")
from attention_cases import build_metadata, random_inputs
from loom.plugins.attention.triton import backend as B
from loom.plugins.attention.triton.backend import TritonAttention

H, KVH, D, BS, DT = 32, 8, 128, 16, torch.bfloat16
dev = torch.device("cuda")

def decode_case(batch, ctx, splits=None):
    be = TritonAttention(H, KVH, D, D ** -0.5, DT, dev)
    be.kv_splits = splits
    md, nb = build_metadata([(ctx - 1, 1)] * batch, BS, "cuda", max_blocks=ctx // BS)
    q, k, v, cache = random_inputs(md, nb, H, KVH, D, DT, "cuda")
    q, k, v = q.clone(), k.clone(), v.clone()
    be.forward(q, k, v, cache, md)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        be.forward(q, k, v, cache, md)
        with torch.cuda.graph(g, stream=s):
            be.forward(q, k, v, cache, md)
    torch.cuda.current_stream().wait_stream(s)
    ms = do_bench(g.replay, warmup=10, rep=50)
    return ms, batch * ctx * KVH * D * 2 * 2 / ms / 1e6

def prefill_case(seqs):
    be = TritonAttention(H, KVH, D, D ** -0.5, DT, dev)
    md, nb = build_metadata(seqs, BS, "cuda")
    q, k, v, cache = random_inputs(md, nb, H, KVH, D, DT, "cuda")
    ms = do_bench(lambda: be.forward(q, k, v, cache, md), warmup=10, rep=50)
    flops = sum(4 * H * D * (c * n + n * (n + 1) // 2) for c, n in seqs)
    return ms, flops / ms / 1e9

def sdpa_case(n):
    q = torch.randn(1, H, n, D, device=dev, dtype=DT)
    k = torch.randn(1, KVH, n, D, device=dev, dtype=DT)
    v = torch.randn_like(k)
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ms = do_bench(f, warmup=10, rep=50)
    return ms, 4 * H * D * n * (n + 1) / 2 / ms / 1e9

def log(**kw):
    print(json.dumps(kw), flush=True)

mode = sys.argv[1]
t0 = time.time()
if mode in ("decode", "all"):
    for tile, warps in [(64, 4), (64, 2)]:
        B.DECODE_TILE[2], B.DECODE_WARPS[2] = tile, warps
        for batch, ctx in [(1, 8192), (1, 32768), (8, 8192), (32, 4096), (64, 2048), (256, 1024), (256, 4096)]:
            ms, gbs = decode_case(batch, ctx)
            log(kind="decode", tile=tile, warps=warps, batch=batch, ctx=ctx, splits="auto", us=round(ms * 1e3, 1), GBps=round(gbs))
    B.DECODE_TILE[2], B.DECODE_WARPS[2] = 64, 4
    for batch, ctx in [(1, 8192), (8, 8192), (32, 4096), (64, 2048)]:
        for sp in (1, 8, 32):
            ms, gbs = decode_case(batch, ctx, sp)
            log(kind="decode", batch=batch, ctx=ctx, splits=sp, us=round(ms * 1e3, 1), GBps=round(gbs))
if mode in ("prefill", "all"):
    for n in (1024, 4096):
        ms, tf = sdpa_case(n)
        log(kind="sdpa", n=n, ms=round(ms, 3), TFLOPs=round(tf))
    for bm, tile, warps in [(64, 64, 4), (64, 128, 4), (128, 64, 4), (64, 64, 8)]:
        B.PREFILL_BLOCK_M[2], B.PREFILL_TILE, B.PREFILL_WARPS = bm, tile, warps
        for name, seqs in [("fresh4096", [(0, 4096)]), ("fresh1024", [(0, 1024)]), ("chunk512x4_prefix8k", [(8192, 512)] * 4), ("mixed", [(2000, 1)] * 32 + [(3000, 256)] * 2), ("mixed_long_decode", [(32000, 1)] * 2 + [(0, 1024)])]:
            ms, gf = prefill_case(seqs)
            log(kind="prefill", block_m=bm, tile=tile, warps=warps, case=name, ms=round(ms, 3), TFLOPs=round(gf))
print("total", time.time() - t0)
