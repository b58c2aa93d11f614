"""Block-scaled FP8 GEMM: y = (a * a_scale) @ (b * b_scale)^T for fp8 a [M, K] with a scale per
row and K block (a_scale [M, KB], dynamic per-token-group activations) and fp8 b [N, K] with a
scale per row and K block (b_scale [N, KB]: a checkpoint's [N/128, K/128] block scales, repeated
over the rows of each block so that fused shards need not be multiples of 128).

Each program owns a BLOCK_M x BLOCK_N tile of y and walks its share of K in BLOCK_K steps, each
inside one scale block: one fp8 tl.dot of the a tile and the [BLOCK_K, BLOCK_N] tile of b^T
(loaded transposed through its strides), scaled by the two scale vectors of that block, added to
the fp32 accumulator. Decode-sized M splits K (split_k.py). The grid and
the constexprs depend only on shapes and dtypes (graph safe).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from loom.plugins.quant.triton.split_k import TileConfig, plan_split_k


Fp8BlockConfig = TileConfig


def pick_config(m: int) -> Fp8BlockConfig:
    if m <= 16:
        return Fp8BlockConfig(16, 64, 128, 4, 4)
    if m <= 64:
        return Fp8BlockConfig(64, 64, 128, 4, 3)
    return Fp8BlockConfig(128, 128, 128, 8, 3)


@triton.jit
def _fp8_block_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, y_ptr, M, N, K, scale_block, k_chunk,
                      stride_am, stride_asm, stride_bn, stride_bsn, stride_ys, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
    k_start = tl.program_id(2) * k_chunk
    k_end = tl.minimum(k_start + k_chunk, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_end
        a = tl.load(a_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        kb = k0 // scale_block
        a_scale = tl.load(as_ptr + rm * stride_asm + kb, mask=m_ok, other=0.0)
        b_scale = tl.load(bs_ptr + rn * stride_bsn + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * a_scale[:, None] * b_scale[None, :]
    y = y_ptr + tl.program_id(2) * stride_ys + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_block_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   scale_block: int, out_dtype: torch.dtype, config: Fp8BlockConfig | None = None,
                   split_k: int | None = None) -> torch.Tensor:
    """fp8 a [M, K] (a_scale [M, KB] fp32) @ fp8 b [N, K]^T (b_scale [N, KB] fp32) -> [M, N]."""
    M, K = a.shape
    N = b.shape[0]
    cfg = config or pick_config(M)
    block_k = min(cfg.block_k, scale_block)
    if scale_block % block_k:
        raise ValueError(f"fp8_block_gemm: scale block {scale_block} is not a multiple of "
                         f"BLOCK_K {block_k}")
    plan = plan_split_k(M, N, K, cfg, block_k, split_k, out_dtype, a.device)
    _fp8_block_kernel[plan.grid](
        a, a_scale, b, b_scale, plan.out, M, N, K, scale_block, plan.k_chunk,
        a.stride(0), a_scale.stride(0), b.stride(0), b_scale.stride(0),
        plan.split_stride, plan.out.stride(-2),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return plan.result(out_dtype)
