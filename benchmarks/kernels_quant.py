"""The quantized linears on one GPU, Llama-3-8B shapes: each method's whole ``apply`` (activation
quantization included) against bf16 F.linear and the measured ceilings.

    python benchmarks/kernels_quant.py [--json OUT] [--sweep] [--gemv | --gemv-only]

Decode (M = 1..8) is timed in a CUDA graph over copies of the layer that together exceed the L2,
so every call streams its weight from HBM: GB/s = weight bytes (scales and zeros included) / time,
against a device-to-device copy (read + written / time). Prefill (M = 256..4096) is timed with
triton.testing.do_bench: TFLOP/s = 2MNK / time, against cuBLAS bf16, torch._scaled_mm fp8 and
torch._int_mm int8 at 8192^3. ``w4a16 dequant+mm`` (dequantize, then cuBLAS) shows where the
Triton GEMM should hand large M over. ``--sweep`` times W4A16 tile configurations per M. Also
printed: the weight GB of a whole Llama-3-8B per method. Results are checked against
dequantize-then-matmul (rel_err).

``--gemv`` (``--gemv-only``: nothing else) sweeps the W4A16/W8A16 GEMV's configurations
(GEMV_CONFIGS; ``--configs`` picks some) at M = 1, 2, 4, 8 for int4 g128, int4 g128 with act
order (a g_idx, stored sorted: x read through a perm) and int8 per channel: each timed in a CUDA
graph over copies that together exceed the L2, GB/s of the packed weight + scales + zeros, against
bf16 F.linear timed the same way and the copy bandwidth; a line per cell, a table of the best
config per cell, JSON under "gemv" and "gemv_best". ``--tiny`` runs it on tiny shapes, one copy,
wall-clock timing: with ``--device cpu --dtype float32`` and TRITON_INTERPRET=1 it exercises the
code paths without a GPU (the times mean nothing there; rel_err does).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from loom.bench.common import copy_bandwidth, git_commit
from loom.models.layers import Linear
from loom.plugins.quant.schemes.base import Dense
from loom.plugins.quant.schemes.fp8 import Fp8Scheme
from loom.plugins.quant.schemes.int8 import Int8W8A8, dynamic_params, quantize_act
from loom.plugins.quant.schemes.wna16 import GPTQLayout, WNA16Scheme, dequantize, unpack_cols
from loom.plugins.quant.triton.wna16 import WNA16Config, wna16_gemm
from loom.plugins.quant.native import wna16_gemv as native_gemv
from loom.plugins.quant.native.wna16_gemv import NativeGemvConfig
from loom.plugins.quant.triton.wna16_gemv import WNA16GemvConfig, wna16_gemv

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 4096, 14336, 32, 128256
LINEARS = {"qkv": (6144, HIDDEN), "o_proj": (HIDDEN, HIDDEN),            # name: (N, K)
           "gate_up": (2 * INTERMEDIATE, HIDDEN), "down": (HIDDEN, INTERMEDIATE)}
DECODE_M, PREFILL_M = (1, 2, 4, 8), (256, 1024, 4096)
OUT_OF_L2_BYTES = 512 << 20
SWEEP = [WNA16Config(16, n, k, w, s) for n, k, w, s in [
    (32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4), (128, 64, 4, 5)]] + [
    WNA16Config(m, n, 64, w, 3) for m, n, w in [(64, 64, 4), (64, 128, 4), (128, 128, 8)]]
METHODS = {   # name: scheme factory
    "bf16": lambda: Dense(),
    "w4a16 g128": lambda: GPTQLayout(4, 128, v1=False),
    "w4a16 g128 g_idx": lambda: GPTQLayout(4, 128, v1=False, desc_act=True),
    "w8a16 channel": lambda: GPTQLayout(8, -1, v1=False),
    "fp8 tensor static": lambda: Fp8Scheme("tensor", "static"),
    "fp8 channel dynamic": lambda: Fp8Scheme("channel", "token"),
    "fp8 block": lambda: Fp8Scheme("block", "group", (128, 128), "weight_scale_inv"),
    "int8 w8a8 dynamic": lambda: Int8W8A8("channel", static=False, symmetric=True),
}
GEMV_METHODS = ("w4a16 g128", "w4a16 g128 g_idx", "w8a16 channel")
GEMV_CONFIGS = {   # name: config; default: the kernel's (128 rows, 128 inputs, 4 warps, 4 stages)
    "default": None,
    "n64k128": WNA16GemvConfig(64, 128, 4, 4),
    "n128k128s6": WNA16GemvConfig(128, 128, 4, 6),
    "n128k128w8": WNA16GemvConfig(128, 128, 8, 4),
    "n128k256": WNA16GemvConfig(128, 256, 4, 4),      # int4 g128: scales per word
    "n128k128p1": WNA16GemvConfig(128, 128, 4, 4, programs_per_sm=1),
    "n128k128p4": WNA16GemvConfig(128, 128, 4, 4, programs_per_sm=4),
    # one row of bf16 x over int4 takes the PTX path unless fast_dequant is off ("pure": the
    # fp32 planes, as before it); 256 rows per step: 23 SASS instructions per word, 128: 27
    "pure": WNA16GemvConfig(fast_dequant=False),
    "n256k128": WNA16GemvConfig(256, 128, 4, 4),
    "n256k128w8": WNA16GemvConfig(256, 128, 8, 4),
    # the native int4 GEMV (csrc/wna16_gemv.cu), 1-4 rows of x: "cuda" is its default, else
    # cuda{rows per warp}x{loads per lane}b{blocks per SM}p{batches prefetched into L2}
    "cuda": NativeGemvConfig(),
    "cudamma": NativeGemvConfig(mma=True),    # the tensor-core path (one row of x)
    **{f"cuda{r}x{u}b{b}p{p}": NativeGemvConfig(r, u, b, p) for r, u, b, p in [
        (2, 4, 2, 0), (2, 4, 2, 4), (1, 4, 2, 2), (1, 4, 2, 4), (1, 4, 3, 2), (4, 4, 1, 2),
        (4, 4, 1, 4), (2, 2, 3, 2), (2, 2, 3, 4), (4, 2, 2, 2), (1, 2, 4, 4), (2, 8, 1, 2),
        (1, 8, 2, 2), (1, 4, 2, 0), (2, 2, 3, 0), (2, 2, 2, 0), (1, 8, 2, 0), (4, 2, 2, 0),
        (2, 8, 1, 0)]},
    # torch's int4 kernel (tinygemm, _weight_int4pack_mm), bf16 x, for comparison
    "tinygemm": "tinygemm",
}
TINY_LINEARS = {"qkv": (192, 256), "o_proj": (128, 256), "gate_up": (448, 256),
                "down": (128, 512)}
DEVICE = "cuda"
DTYPE = torch.bfloat16   # --dtype: activations, dense weights, the quantized layers' scales


def random_layer(method: str, n: int, k: int) -> Linear:
    """A layer of ``method`` with random checkpoint tensors, processed as after loading."""
    with torch.device(DEVICE):
        layer = Linear(k, [n], False, METHODS[method](), DTYPE)
        for name, param in list(layer.named_parameters()) + list(layer.named_buffers()):
            if name != "g_idx" or layer.quant_method.desc_act:
                fill(name, param.data, n, k)
    layer.quant_method.process_after_loading(layer)
    return layer


def fill(name: str, t: torch.Tensor, n: int, k: int) -> None:
    if name == "g_idx":
        t.copy_(torch.randperm(k, device=DEVICE).view(1, k) % (k // 128))
    elif name == "weight_shape":
        t.copy_(torch.tensor([[n, k]]))
    elif t.dtype == torch.int32:
        t.random_(-2**31, 2**31 - 1)
    elif t.dtype == torch.int8:
        t.random_(-127, 127)
    elif t.dtype == torch.float8_e4m3fn:
        t.copy_(torch.randn(t.shape, device=DEVICE) * 100)
    elif "scale" in name:
        t.copy_(torch.rand(t.shape, device=DEVICE) * 1e-3 + 1e-4 if "input" not in name
                else torch.full(t.shape, 0.02, device=DEVICE))
    else:
        t.copy_(torch.randn(t.shape, device=DEVICE) * k ** -0.5)


def weight_bytes(layer: Linear) -> int:
    return sum(b.numel() * b.element_size() for name, b in layer.named_buffers()) + sum(
        p.numel() * p.element_size() for p in layer.parameters())


def reference(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """dequantize-then-matmul in fp32 (activation quantization included through the twin)."""
    scheme = layer.quant_method
    if isinstance(scheme, WNA16Scheme):
        w = dequantize(layer.w_q, layer.w_scales.float(), layer.w_zeros.float(), layer.w_g_idx,
                       scheme.bits, layer.group_size)
        xs = x.float() if layer.w_perm is None else x.float()[:, layer.w_perm.long()]
        return xs @ w.T
    if isinstance(scheme, Fp8Scheme):
        return F.linear(scheme.fake_quant_act(layer, x.float()),
                        scheme.dequantized_weight(layer, torch.float32))
    if isinstance(scheme, Int8W8A8):
        scale, _ = dynamic_params(x, symmetric=True)
        xd = quantize_act(x, scale, None).float() * scale
        return F.linear(xd, layer.w_int8.float() * layer.w_scale[:, None])
    return x.float() @ layer.weight.float().T


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def time_decode(layers: list[Linear], x: torch.Tensor) -> float:
    graph_ms = do_bench_cudagraph(lambda: [layer(x) for layer in layers], return_mode="median")
    return graph_ms * 1e3 / len(layers)


def bench_method(method: str, linear: str, ceilings: dict) -> list[dict]:
    n, k = LINEARS[linear]
    first = random_layer(method, n, k)
    nbytes = weight_bytes(first)
    layers = [first] + [random_layer(method, n, k) for _ in range(OUT_OF_L2_BYTES // nbytes)]
    rows = []
    for m in DECODE_M + PREFILL_M:
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        err = rel_err(first(x), reference(first, x))
        if m in DECODE_M:
            t = time_decode(layers, x)
        else:
            t = do_bench(lambda: first(x), return_mode="median") * 1e3
        row = {"method": method, "linear": linear, "n": n, "k": k, "m": m, "us": t,
               "gbs": nbytes / t / 1e3, "tflops": 2 * m * n * k / t / 1e6, "rel_err": err}
        row["of_ceiling"] = (row["gbs"] / ceilings["copy_gbs"] if m in DECODE_M
                             else row["tflops"] / ceilings[compute_ceiling(method)])
        rows.append(row)
        print(f"{method:>20} {linear:>8} M={m:<5} {t:9.1f} us {row['gbs']:7.0f} GB/s "
              f"{row['tflops']:7.1f} TFLOP/s ({row['of_ceiling']:4.0%} of ceiling) err {err:.1e}",
              flush=True)
    del layers
    torch.cuda.empty_cache()
    return rows


def compute_ceiling(method: str) -> str:
    return "fp8_tflops" if method.startswith("fp8") else (
        "int8_tops" if method.startswith("int8") else "bf16_tflops")


def bench_dequant_mm(linear: str) -> list[dict]:
    """The alternative for large M: dequantize the W4A16 weight, then cuBLAS."""
    n, k = LINEARS[linear]
    layer = random_layer("w4a16 g128", n, k)
    rows = []
    for m in PREFILL_M:
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        t = do_bench(lambda: F.linear(x, dequantize(layer.w_q, layer.w_scales, layer.w_zeros,
                                                    None, 4, 128)), return_mode="median") * 1e3
        rows.append({"method": "w4a16 dequant+mm", "linear": linear, "m": m, "us": t,
                     "tflops": 2 * m * n * k / t / 1e6})
        print(f"{'w4a16 dequant+mm':>20} {linear:>8} M={m:<5} {t:9.1f} us "
              f"{rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
    return rows


def bench_sweep(linear: str) -> list[dict]:
    n, k = LINEARS[linear]
    layers = [random_layer("w4a16 g128", n, k) for _ in range(8)]
    rows = []
    for m in DECODE_M + PREFILL_M:
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        for cfg in SWEEP:
            if (cfg.block_m == 16) != (m <= 16):
                continue
            call = lambda l, cfg=cfg: wna16_gemm(x, l.w_q, l.w_scales, l.w_zeros, None, 4, 128,
                                                 config=cfg)
            t = (do_bench_cudagraph(lambda: [call(l) for l in layers], return_mode="median")
                 * 1e3 / len(layers) if m in DECODE_M
                 else do_bench(lambda: call(layers[0]), return_mode="median") * 1e3)
            rows.append({"linear": linear, "m": m, "config": cfg.__dict__, "us": t})
            print(f"sweep {linear:>8} M={m:<5} {cfg} {t:9.1f} us", flush=True)
    return rows


def time_calls(calls: list) -> float:
    """µs per call: a CUDA graph replaying them all on a GPU, the wall clock elsewhere."""
    if DEVICE == "cuda":
        return do_bench_cudagraph(lambda: [c() for c in calls], return_mode="median") * 1e3 / len(
            calls)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for c in calls:
            c()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6 / len(calls)


def copies_of(method: str, n: int, k: int, copies: int | None) -> list[Linear]:
    """Layers of ``method`` whose weights together exceed the L2 (or ``copies`` of them)."""
    first = random_layer(method, n, k)
    count = copies or max(1, OUT_OF_L2_BYTES // weight_bytes(first))
    return [first] + [random_layer(method, n, k) for _ in range(count - 1)]


def gemv_applies(layer: Linear, x: torch.Tensor, config) -> bool:
    scheme = layer.quant_method
    if config == "tinygemm":
        return (DEVICE == "cuda" and scheme.bits == 4 and layer.w_perm is None
                and x.dtype == torch.bfloat16)
    if isinstance(config, NativeGemvConfig):
        if not native_gemv.applies(x, layer.w_q, layer.w_scales, scheme.bits, layer.group_size,
                                   layer.w_g_idx):
            return False
        if config.mma:
            return x.shape[0] == 1 and native_gemv.mma_applies(x.shape[1], layer.group_size)
        return (config.rows_per_warp, config.loads_per_lane) in native_gemv.BUILT[x.shape[0]]
    return True


def tinygemm_call(layer: Linear, x: torch.Tensor):
    """torch._weight_int4pack_mm on the layer's codes: w = (q - 8) * scale + (8 - zero) * scale."""
    codes = unpack_cols(layer.w_q, 4)                                  # [N, K]
    packed = torch._convert_weight_to_int4pack(
        (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous(), 8)
    scales = layer.w_scales.float()
    sz = torch.stack([scales, (8 - layer.w_zeros.float()) * scales], -1)  # [N, G, 2]
    sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)
    gs = layer.group_size
    return lambda: torch._weight_int4pack_mm(x, packed, gs, sz)


def gemv_call(layer: Linear, x: torch.Tensor, config):
    scheme = layer.quant_method
    if config == "tinygemm":
        return tinygemm_call(layer, x)
    if isinstance(config, NativeGemvConfig):
        return lambda: native_gemv.int4_gemv(x, layer.w_q, layer.w_scales, layer.w_zeros,
                                             layer.w_perm, layer.group_size, config=config)
    return lambda: wna16_gemv(x, layer.w_q, layer.w_scales, layer.w_zeros, layer.w_perm,
                              scheme.bits, layer.group_size, config=config)


def bench_gemv_linear(linear: str, configs: dict, rows_m: tuple, copy_gbs: float,
                      copies: int | None, methods=GEMV_METHODS) -> list[dict]:
    """Every config of the GEMV on one linear, per method and M, against F.linear on a dense
    weight (bf16 unless --dtype)."""
    n, k = LINEARS[linear]
    dense = [torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k ** -0.5
             for _ in range(copies or max(1, OUT_OF_L2_BYTES // (2 * n * k)))]
    xs = {m: torch.randn(m, k, device=DEVICE, dtype=DTYPE) for m in rows_m}
    dense_us = {m: time_calls([lambda w=w, x=x: F.linear(x, w) for w in dense])
                for m, x in xs.items()}
    del dense
    out = []
    for method in methods:
        layers = copies_of(method, n, k, copies)
        nbytes = weight_bytes(layers[0])
        for m, x in xs.items():
            ref = reference(layers[0], x)
            for name, cfg in configs.items():
                if not gemv_applies(layers[0], x, cfg):
                    continue
                try:
                    err = rel_err(gemv_call(layers[0], x, cfg)(), ref)
                except Exception as e:   # a comparison kernel missing here: say so, go on
                    print(f"gemv {linear} {method} M={m} {name}: {type(e).__name__}: {e}")
                    continue
                t = time_calls([gemv_call(layer, x, cfg) for layer in layers])
                out.append({"linear": linear, "n": n, "k": k, "method": method, "m": m,
                            "config": name, "config_fields": dataclasses.asdict(cfg)
                            if dataclasses.is_dataclass(cfg) else cfg, "us": t, "gbs": nbytes / t / 1e3,
                            "of_copy": nbytes / t / 1e3 / copy_gbs, "dense_us": dense_us[m],
                            "vs_dense": dense_us[m] / t, "weight_bytes": nbytes, "rel_err": err})
                print_gemv_row(out[-1])
        del layers
    return out


def print_gemv_row(r: dict) -> None:
    print(f"gemv {r['linear']:>8} {r['method']:>17} M={r['m']:<2} {r['config']:>11} "
          f"{r['us']:8.1f} us {r['gbs']:6.0f} GB/s ({r['of_copy']:4.0%} of copy) "
          f"dense {r['dense_us']:7.1f} us x{r['vs_dense']:4.2f} err {r['rel_err']:.1e}",
          flush=True)


def best_gemv_configs(rows: list[dict]) -> list[dict]:
    """The fastest config of each (linear, method, M), printed as a table."""
    best = {}
    for r in rows:
        key = (r["linear"], r["method"], r["m"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print(f"{'linear':>8} {'method':>17} {'M':>2} {'best':>11} {'us':>8} {'GB/s':>6} "
          f"{'copy':>5} {'dense us':>8} {'x dense':>7}")
    for r in best.values():
        print(f"{r['linear']:>8} {r['method']:>17} {r['m']:>2} {r['config']:>11} {r['us']:8.1f} "
              f"{r['gbs']:6.0f} {r['of_copy']:5.0%} {r['dense_us']:8.1f} {r['vs_dense']:7.2f}")
    return list(best.values())


def measured_ceilings() -> dict:
    size = 8192
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    fa, fb = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T
    ia, ib = (a * 10).to(torch.int8), (b * 10).to(torch.int8).T
    one = torch.tensor(1.0, device=DEVICE)
    flops = 2 * size ** 3
    return {
        "copy_gbs": copy_bandwidth(torch.device(DEVICE), torch.cuda.synchronize, 2 << 30) / 1e9,
        "bf16_tflops": flops / do_bench(lambda: a @ b, return_mode="median") / 1e9,
        "fp8_tflops": flops / do_bench(lambda: torch._scaled_mm(
            fa, fb, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
            return_mode="median") / 1e9,
        "int8_tops": flops / do_bench(lambda: torch._int_mm(ia, ib), return_mode="median") / 1e9,
    }


def model_weight_gb() -> dict:
    """Weight GB of a whole Llama-3-8B per method: the linears quantized, embeddings and lm_head
    in bf16."""
    dense = 2 * VOCAB * HIDDEN * 2
    out = {}
    for method in METHODS:
        per_layer = sum(weight_bytes(random_layer(method, n, k)) for n, k in LINEARS.values())
        out[method] = (LAYERS * per_layer + dense) / 1e9
        torch.cuda.empty_cache()
    return out


def main() -> None:
    global DEVICE, DTYPE, LINEARS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--sweep", action="store_true", help="also time W4A16 GEMM tile configurations")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--gemv", action="store_true", help="also sweep the W4A16/W8A16 GEMV configs")
    p.add_argument("--gemv-only", action="store_true", help="only the GEMV sweep")
    p.add_argument("--configs", nargs="*", default=list(GEMV_CONFIGS),
                   choices=list(GEMV_CONFIGS), help="GEMV configs to sweep")
    p.add_argument("--gemv-methods", nargs="*", default=list(GEMV_METHODS),
                   choices=list(GEMV_METHODS), help="methods of the GEMV sweep")
    p.add_argument("--linears", nargs="*", default=list(LINEARS), choices=list(LINEARS))
    p.add_argument("--rows", nargs="*", type=int, default=list(DECODE_M),
                   help="rows of x (M) for the GEMV sweep")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes, one copy of each weight (exercising the code paths)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: with --gemv-only --tiny under TRITON_INTERPRET=1")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="of the GEMV sweep (float32 on the CPU: the interpreter's bf16 dot is "
                        "wrong, triton-lang/triton#11584)")
    args = p.parse_args()
    DEVICE, DTYPE = args.device, getattr(torch, args.dtype)
    if args.tiny:
        LINEARS = TINY_LINEARS
    if DEVICE == "cpu" and not (args.gemv_only and args.tiny):
        p.error("--device cpu runs only --gemv-only --tiny (with TRITON_INTERPRET=1)")
    if DTYPE != torch.bfloat16 and not args.gemv_only:
        p.error("--dtype applies to --gemv-only (the other tables are bfloat16)")
    torch.manual_seed(0)
    record = {"benchmark": "kernels_quant", "commit": git_commit(),
              "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
              "command": "python " + shlex.join(sys.argv)}
    if args.gemv_only:
        sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
        record["ceilings"] = {"copy_gbs": copy_bandwidth(
            torch.device(DEVICE), sync, (2 << 30) if DEVICE == "cuda" else (16 << 20)) / 1e9}
    else:
        record.update(run_methods(args))
    if args.gemv or args.gemv_only:
        configs = {name: GEMV_CONFIGS[name] for name in args.configs}
        rows = [r for linear in args.linears for r in bench_gemv_linear(
            linear, configs, tuple(args.rows), record["ceilings"]["copy_gbs"],
            1 if args.tiny else None, args.gemv_methods)]
        record["gemv"] = rows
        record["gemv_best"] = best_gemv_configs(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


def run_methods(args) -> dict:
    """Every method's apply on every linear, the dequant+mm baseline, the GEMM sweep."""
    ceilings = measured_ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {ceilings['copy_gbs']:.0f} GB/s, bf16 "
          f"{ceilings['bf16_tflops']:.0f} TFLOP/s, fp8 {ceilings['fp8_tflops']:.0f} TFLOP/s, "
          f"int8 {ceilings['int8_tops']:.0f} TOP/s")
    weight_gb = model_weight_gb()
    for method, gb in weight_gb.items():
        print(f"Llama-3-8B weights, {method:>20}: {gb:6.2f} GB")
    rows = [r for method in args.methods for linear in args.linears
            for r in bench_method(method, linear, ceilings)]
    rows += [r for linear in args.linears for r in bench_dequant_mm(linear)]
    sweep = [r for linear in args.linears for r in bench_sweep(linear)] if args.sweep else []
    return {"ceilings": ceilings, "weight_gb": weight_gb, "linears": rows, "sweep": sweep}


if __name__ == "__main__":
    main()
