"""Dynamic per-token FP8 quantization of activations in one kernel: for each row of x [M, K],
scale = max(|x|) / fp8_max (at least 1e-12 / fp8_max) and x / scale rounded to fp8, which the
torch twin (schemes/fp8.py quantize_act "token") computes in five kernels. One program per row:
a pass over the row for its max, a second to quantize (the row is read twice, from L2).
Division is IEEE (div_rn) so the codes equal the twin's bit for bit. Graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, FP8_MAX: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0), 1e-12) / FP8_MAX
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        y = tl.clamp(tl.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * stride_q + offs, y.to(q_ptr.dtype.element_ty), mask=offs < K)


def per_token_quant_fp8(x: torch.Tensor, fp8_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 x [M, K], fp32 scale [M, 1])."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=fp8_dtype, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _per_token_fp8_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0),
                                    FP8_MAX=torch.finfo(fp8_dtype).max, BLOCK=BLOCK,
                                    num_warps=4)
    return q, scale
