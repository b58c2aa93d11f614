"""Each Llama-3-8B linear's native int4 GEMV (one row of bf16 x, GPTQ 4-bit g128, the default
config), launched as the model launches it (qkv and gate_up with the RMSNorm fused, gate_up with
the residual, down with SiLU-and-mul), for a kernel profiler to look at:

    ncu --clock-control none -k regex:int4_gemv --launch-skip 8 --launch-count 4 \\
        python benchmarks/native_gemv_once.py

Two warm-up rounds (8 launches), then one launch of each linear in the order qkv, o_proj,
gate_up, down.
"""
from __future__ import annotations

import torch

from loom.plugins.quant.native import wna16_gemv as native
from loom.quant import FusedInput

from kernels_quant import LINEARS, random_layer


def calls():
    out = []
    for name, (n, k) in LINEARS.items():
        layer = random_layer("w4a16 g128", n, k)
        if name == "down":
            x = FusedInput("silu_and_mul", torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16))
        elif name == "o_proj":
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        else:
            h = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
            res = torch.randn_like(h) if name == "gate_up" else None
            x = FusedInput("rms_norm", h, w, 1e-5, res, torch.empty_like(h) if res is not None else None)
        out.append(lambda layer=layer, x=x: native.int4_gemv(
            x, layer.w_q, layer.w_scales, layer.w_zeros, layer.w_perm, layer.group_size))
    return out


def main() -> None:
    fns = calls()
    for _ in range(3):
        for f in fns:
            f()
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
