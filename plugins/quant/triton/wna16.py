"""W4A16/W8A16 GEMM: y = x @ W^T for x [M, K] and an int4/int8 W in the layout of
``schemes/wna16.py``: int32 [N, K/pf] (the code of input k in bits (k % pf) * bits of word k // pf),
scales and zeros [N, G], optional g_idx [K] or perm [K].

Each program owns a BLOCK_M x BLOCK_N tile of y and walks its share of K in BLOCK_K steps. It loads
the [BLOCK_N, BLOCK_K/pf] words of the weight tile once, widens them to [BLOCK_N, BLOCK_K] with
interleaves (each word repeated over the pf inputs it holds), shifts each input's code out,
dequantizes in registers, (q - zero) * scale in fp32 rounded to the activation dtype, and meets
the x tile in one tl.dot. With g_idx the scale and zero of every input are gathered; without it a
BLOCK_K step lies inside one group and loads one column of each. With a perm (act order sorted at
load time) the x tile is gathered through it. Decode-sized M leaves too few tiles to fill the GPU,
so K is split over SPLIT_K programs whose fp32 partial sums are added afterwards (the scheme takes
wna16_gemv.py for small M). The grid and the constexprs depend only on shapes and dtypes, so the
kernel is safe to capture in a graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loom.plugins.quant.triton.split_k import TileConfig, plan_split_k

WNA16Config = TileConfig


def pick_config(m: int) -> WNA16Config:
    if m <= 16:
        return WNA16Config(16, 64, 128, 4, 4)
    if m <= 64:
        return WNA16Config(64, 64, 64, 4, 3)
    return WNA16Config(128, 128, 64, 8, 3)


@triton.jit
def _wna16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, y_ptr, M, N, K, group_size,
                  k_chunk, stride_xm, stride_wn, stride_sn, stride_ys, stride_ym,
                  BITS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_PERM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    s_rows = rn.to(tl.int64)[:, None] * stride_sn
    k_start = tl.program_id(2) * k_chunk
    k_end = tl.minimum(k_start + k_chunk, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        rw = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        k_ok = rk < k_end
        x_cols = tl.load(perm_ptr + rk, mask=k_ok, other=0) if HAS_PERM else rk
        x = tl.load(x_rows + x_cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        words = tl.load(w_rows + rw[None, :], mask=n_ok[:, None] & (rw < k_end // PACK)[None, :],
                        other=0)
        words = tl.interleave(words, words)
        words = tl.interleave(words, words)
        if BITS == 4:
            words = tl.interleave(words, words)
        q = (words >> ((rk % PACK) * BITS)[None, :]) & ((1 << BITS) - 1)
        if HAS_G_IDX:
            at = s_rows + tl.load(g_ptr + rk, mask=k_ok, other=0)[None, :]
            scale = tl.load(s_ptr + at, mask=n_ok[:, None], other=0.0)
            zero = tl.load(z_ptr + at, mask=n_ok[:, None], other=0.0)
        else:
            at = s_rows + k0 // group_size
            scale = tl.load(s_ptr + at, mask=n_ok[:, None], other=0.0)
            zero = tl.load(z_ptr + at, mask=n_ok[:, None], other=0.0)
        w = ((q.to(tl.float32) - zero.to(tl.float32)) * scale.to(tl.float32)).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    y = y_ptr + tl.program_id(2) * stride_ys + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def wna16_gemm(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor | None, bits: int, group_size: int,
               perm: torch.Tensor | None = None, config: WNA16Config | None = None,
               split_k: int | None = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype; group_size is K for one group per row of W."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    N = w_q.shape[0]
    cfg = config or pick_config(M)
    block_k = cfg.block_k if g_idx is not None or group_size >= K else min(cfg.block_k, group_size)
    if g_idx is None and group_size < K and group_size % block_k:
        raise ValueError(f"wna16_gemm: group size {group_size} is not a multiple of "
                         f"BLOCK_K {block_k}")
    if block_k % (32 // bits):
        raise ValueError(f"wna16_gemm: BLOCK_K {block_k} is not a multiple of the packing "
                         f"({32 // bits})")
    plan = plan_split_k(M, N, K, cfg, block_k, split_k, x.dtype, x.device)
    _wna16_kernel[plan.grid](
        x, w_q, scales, zeros, w_q if g_idx is None else g_idx, w_q if perm is None else perm,
        plan.out, M, N, K, group_size, plan.k_chunk, x.stride(0), w_q.stride(0), scales.stride(0),
        plan.split_stride, plan.out.stride(-2), BITS=bits, HAS_G_IDX=g_idx is not None,
        HAS_PERM=perm is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return plan.result(x.dtype)
