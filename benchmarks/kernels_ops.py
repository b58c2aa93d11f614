"""The Triton fused ops and GEMV against their torch twins on one GPU, Llama-3-8B shapes.

    python benchmarks/kernels_ops.py [--dtype bfloat16] [--json OUT]

Medians in µs. ``us``: triton.testing.do_bench, the L2 cache flushed before each call (so
eager launch gaps mostly hide behind the flush). ``graph_us``: do_bench_cudagraph, the calls
replayed in a CUDA graph as in decode; a GEMV there rotates over copies of its weight that
together exceed the L2, so every call streams its weight from HBM. GB/s: weight bytes / time,
against the ceiling of a device-to-device copy (bytes read + written / time).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from loom.bench.common import copy_bandwidth, git_commit
from loom.ops import FusedOps
from loom.plugins.ops.triton import TritonFusedOps
from loom.plugins.quant.triton.gemv import DEFAULT_CONFIG, GemvConfig, gemv

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336
TOKENS = (1, 32, 256)
ROWS = (1, 2, 4, 8, 16)                           # 16: is raising gemv.MAX_M worth it?
LINEARS = {                                       # name: (N, K) of the weight
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_up": (2 * INTERMEDIATE, HIDDEN),
    "down": (HIDDEN, INTERMEDIATE),
    "lm_head": (128256, HIDDEN),
}
CONFIGS = {                                       # GEMV tiles (block_n, block_k, warps, stages)
    "default": DEFAULT_CONFIG,                    # 16 x 256, 4 warps, 4 stages
    "n16k128s6": GemvConfig(16, 128, 4, 6),       # the same bytes in flight, finer steps
    "n16k512s3": GemvConfig(16, 512, 4, 3),       # longer steps
    "n32k256s3": GemvConfig(32, 256, 4, 3),       # half the programs, twice the rows each
    "n32k128s5": GemvConfig(32, 128, 4, 5),
}
OUT_OF_L2_BYTES = 512 << 20                       # weight bytes one graph call rotates over
DEVICE = "cuda"


def us(fn) -> float:
    return do_bench(fn, return_mode="median") * 1e3


def graph_us(fn) -> float:
    return do_bench_cudagraph(fn, return_mode="median") * 1e3


def randn(*shape, dtype) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


def copy_gbs() -> float:
    return copy_bandwidth(torch.device(DEVICE), torch.cuda.synchronize, 2 << 30) / 1e9


def cos_sin_cache(max_pos: int) -> torch.Tensor:
    inv_freq = 500000.0 ** -(torch.arange(0, HEAD_DIM, 2, device=DEVICE) / HEAD_DIM)
    freqs = torch.outer(torch.arange(max_pos, device=DEVICE, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def op_cases(tokens: int, dtype) -> dict:
    """name -> call(ops) on fresh inputs of one step of ``tokens`` tokens."""
    x, res = randn(tokens, HIDDEN, dtype=dtype), randn(tokens, HIDDEN, dtype=dtype)
    weight = randn(HIDDEN, dtype=dtype)
    gate_up = randn(tokens, 2 * INTERMEDIATE, dtype=dtype)
    qkv = randn(tokens, LINEARS["qkv"][0], dtype=dtype)
    q = qkv[:, :HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
    cache = cos_sin_cache(8192)
    return {
        "rms_norm": lambda ops: ops.rms_norm(x, weight, 1e-5),
        "add_rms_norm": lambda ops: ops.add_rms_norm(x, res, weight, 1e-5),
        "silu_and_mul": lambda ops: ops.silu_and_mul(gate_up),
        "rotary": lambda ops: ops.rotary(positions, q, k, cache),
    }


def bench_ops(dtype) -> list[dict]:
    impls = {"torch": FusedOps(), "triton": TritonFusedOps()}
    rows = []
    for tokens in TOKENS:
        for name, call in op_cases(tokens, dtype).items():
            row = {"op": name, "tokens": tokens}
            for impl, ops in impls.items():
                row[f"{impl}_us"] = us(lambda: call(ops))
                row[f"{impl}_graph_us"] = graph_us(lambda: call(ops))
            rows.append(row)
            print(f"{name:>13} T={tokens:<4} torch {row['torch_us']:7.1f} us "
                  f"(graph {row['torch_graph_us']:6.1f})   triton {row['triton_us']:7.1f} us "
                  f"(graph {row['triton_graph_us']:6.1f})", flush=True)
    return rows


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_gemv(dtype, ceiling: float) -> list[dict]:
    impls = {"F.linear": F.linear} | {
        name: (lambda x, w, cfg=cfg: gemv(x, w, config=cfg)) for name, cfg in CONFIGS.items()}
    rows = []
    for linear, (n, k) in LINEARS.items():
        nbytes = n * k * dtype.itemsize
        copies = -(-OUT_OF_L2_BYTES // nbytes)
        weights = [randn(n, k, dtype=dtype) * k ** -0.5 for _ in range(copies)]
        for m in ROWS:
            x = randn(m, k, dtype=dtype)
            ref = x.float() @ weights[0].float().T
            for impl, fn in impls.items():
                t = us(lambda: fn(x, weights[0]))
                g = graph_us(lambda: [fn(x, w) for w in weights]) / copies
                row = {"linear": linear, "n": n, "k": k, "m": m, "impl": impl, "us": t,
                       "gbs": nbytes / t / 1e3, "graph_us": g, "graph_gbs": nbytes / g / 1e3,
                       "rel_err": rel_err(fn(x, weights[0]), ref)}
                rows.append(row)
                print(f"{linear:>8} [{n:6},{k:5}] M={m} {impl:>10} {t:8.1f} us "
                      f"{row['gbs']:6.0f} GB/s   graph {g:8.1f} us {row['graph_gbs']:6.0f} GB/s "
                      f"({row['graph_gbs'] / ceiling:4.0%} of copy)  err {row['rel_err']:.1e}",
                      flush=True)
        del weights
        torch.cuda.empty_cache()
    return rows


def best_gemv(rows: list[dict]) -> list[dict]:
    """Per (linear, M): the fastest implementation in a graph, and its speedup over F.linear."""
    best = []
    for linear in LINEARS:
        for m in ROWS:
            group = [r for r in rows if r["linear"] == linear and r["m"] == m
                     and r["rel_err"] < 1e-2]
            base = next(r for r in group if r["impl"] == "F.linear")
            top = min(group, key=lambda r: r["graph_us"])
            best.append({"linear": linear, "m": m, "impl": top["impl"],
                         "graph_us": top["graph_us"], "graph_gbs": top["graph_gbs"],
                         "speedup_vs_f_linear": base["graph_us"] / top["graph_us"]})
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    ceiling = copy_gbs()
    print(f"{torch.cuda.get_device_name()}: device copy {ceiling:.0f} GB/s (read + write)")
    ops_rows = bench_ops(dtype)
    gemv_rows = bench_gemv(dtype, ceiling)
    best = best_gemv(gemv_rows)
    print("\nfastest GEMV per shape (graph):")
    for b in best:
        print(f"{b['linear']:>8} M={b['m']} {b['impl']:>10} {b['graph_us']:8.1f} us "
              f"{b['graph_gbs']:6.0f} GB/s  x{b['speedup_vs_f_linear']:.2f} vs F.linear")
    if args.json:
        commit = git_commit()
        record = {"benchmark": "kernels_ops", "commit": commit,
                  "device": torch.cuda.get_device_name(),
                  "command": "python " + shlex.join(sys.argv), "dtype": args.dtype,
                  "copy_gbs": ceiling,
                  "gemv_configs": {k: dataclasses.asdict(v) for k, v in CONFIGS.items()},
                  "ops": ops_rows, "gemv": gemv_rows, "gemv_best": best}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
