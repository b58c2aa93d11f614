"""y = x @ W^T (+ bias) for a few rows of x: a GEMV that streams W [N, K] once.

Each program owns BLOCK_N rows of W and walks K in BLOCK_K steps: the [BLOCK_N, BLOCK_K] tile of W
and the x rows, zero-padded to the 16 a tensor-core dot needs, meet in one ``tl.dot`` with fp32
accumulation. Tensor cores leave the loads as the only work, and Triton's software pipeline keeps
``num_stages - 1`` tiles of W in flight per program (cp.async), which is what saturates HBM.
No split-K: the Llama shapes have N >= 4096, so BLOCK_N = 16 already gives >= 256 programs.
Graph safety: the grid and constexprs depend only on shapes, strides and dtypes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ROWS = 16        # x rows a program holds: the smallest M of a tensor-core dot
MAX_M = 8        # the rows gemv_supported accepts (up to ROWS cost the same)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 5


# On the H200 (benchmarks/results/kernels_ops_h200_run1.json, M = 1, in a graph) this config
# beat cuBLAS on Llama-3-8B's qkv (15.3 vs 15.6 us) and o_proj (11.9 vs 13.5 us) but lost on
# the large down (34.1 vs 32.0), gate_up and lm_head weights: take it for small weights only.
DEFAULT_CONFIG = GemvConfig()
MAX_PREFERRED_WEIGHT = 32 << 20   # elements


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    rm = tl.arange(0, ROWS)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + rm[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)[None, :]
        x = tl.load(x_rows + rk, mask=(rm[:, None] < M) & (rk < K), other=0.0)
        w = tl.load(w_rows + rk, mask=(rn[:, None] < N) & (rk < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def gemv_preferred(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Supported, and a weight small enough that the GEMV measured faster than cuBLAS."""
    return weight.numel() <= MAX_PREFERRED_WEIGHT and gemv_supported(x, weight)


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dim() == 2 and weight.dim() == 2 and 1 <= x.shape[0] <= MAX_M
            and x.shape[1] == weight.shape[1] and x.dtype == weight.dtype and x.dtype in DTYPES
            and x.stride(1) == 1 and weight.stride(1) == 1)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias [N]) -> [M, N] in x's dtype; see gemv_supported."""
    M, K = x.shape
    if M > ROWS:
        raise ValueError(f"gemv takes at most {ROWS} rows of x, got {M}")
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, config.block_n),)](
        x, weight, y if bias is None else bias, y, M, N, K, x.stride(0), weight.stride(0),
        y.stride(0), ROWS=ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        HAS_BIAS=bias is not None, num_warps=config.num_warps, num_stages=config.num_stages)
    return y
