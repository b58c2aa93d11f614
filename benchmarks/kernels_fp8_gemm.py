"""FP8 GEMM variants through torch._scaled_mm on the Llama-3-8B linears, against bf16 F.linear:
which orientation and accumulation the FP8 scheme should use at prefill and decode sizes.

    python benchmarks/kernels_fp8_gemm.py [--json OUT]

For y = x W^T with per-token x scales and per-channel W scales (row-wise scaling):
  rowwise       _scaled_mm(x, W^T)                      (what Fp8Scheme.apply_cuda calls)
  rowwise_t     _scaled_mm(W, x^T), then y^T copied back to [M, N] (the copy is timed too)
  *_fast        the same with use_fast_accum=True
  tensor        one scale each (per-tensor), for reference
TFLOP/s = 2MNK / median time (triton.testing.do_bench). Each variant's error against the fp32
product of the dequantized operands is printed (rel_err).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from loom.bench.common import git_commit

LINEARS = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
           "down": (4096, 14336)}
ROWS = (256, 2048, 8192)
FP8 = torch.float8_e4m3fn


def quant_rows(t: torch.Tensor):
    scale = t.abs().amax(1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(FP8).max
    return (t.float() / scale).to(FP8), scale


def variants(x, w):
    xq, xs = quant_rows(x)
    wq, ws = quant_rows(w)
    one = torch.ones((), device=x.device)
    ref = (xq.float() * xs) @ (wq.float() * ws).t()
    calls = {
        "bf16": lambda: F.linear(x, w),
        "rowwise": lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(),
                                            out_dtype=torch.bfloat16),
        "rowwise_fast": lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(),
                                                 out_dtype=torch.bfloat16, use_fast_accum=True),
        "rowwise_t": lambda: torch._scaled_mm(wq, xq.t(), scale_a=ws, scale_b=xs.t(),
                                              out_dtype=torch.bfloat16).t().contiguous(),
        "rowwise_t_fast": lambda: torch._scaled_mm(wq, xq.t(), scale_a=ws, scale_b=xs.t(),
                                                   out_dtype=torch.bfloat16,
                                                   use_fast_accum=True).t().contiguous(),
        "tensor": lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                           out_dtype=torch.bfloat16),
        "tensor_fast": lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                out_dtype=torch.bfloat16, use_fast_accum=True),
    }
    return calls, ref


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--rows", nargs="*", type=int, default=list(ROWS))
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in LINEARS.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            calls, ref = variants(x, w)
            line = []
            for variant, call in calls.items():
                try:
                    out = call()
                    err = None if variant.startswith("tensor") or variant == "bf16" else (
                        ((out.float() - ref).norm() / ref.norm()).item())
                    us = do_bench(call, return_mode="median") * 1e3
                except RuntimeError as e:
                    print(f"{name} M={m} {variant}: {e}".splitlines()[0])
                    continue
                rows.append({"linear": name, "m": m, "n": n, "k": k, "variant": variant,
                             "us": us, "tflops": 2 * m * n * k / us / 1e6, "rel_err": err})
                line.append(f"{variant} {rows[-1]['tflops']:5.0f}")
            print(f"{name:>8} M={m:<5} TFLOP/s: " + ", ".join(line), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "kernels_fp8_gemm", "commit": git_commit(),
                       "device": torch.cuda.get_device_name(),
                       "command": "python " + shlex.join(sys.argv), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
