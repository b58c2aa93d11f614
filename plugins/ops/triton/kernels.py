"""Triton kernels for the fused ops: RMSNorm (optionally with the residual add), SiLU-and-mul
(either optionally quantizing its output per token to fp8 for an FP8 linear after it) and
rotate-half rotary. fp32 math; results rounded where the torch twin rounds. And the paged
KV-cache write by slot mapping, for a [2, num_blocks, block_size, num_kv_heads, head_size] cache
(quantizing to fp8 by per-tensor scales when the cache is fp8).

``rotary_write_kv`` does the rotary and the cache write of a decode step in one kernel, launched
as a programmatic dependent where pdl.enabled (Triton 3.3+, sm_90+).

Graph safety: grids and constexprs depend only on tensor shapes, strides and dtypes.
Triton APIs available since 3.0 are used, and gdc_wait/launch_pdl only where pdl.enabled.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loom import pdl
from loom.attention import is_fp8
from loom.quant import QuantizedInput

SILU_BLOCK = 1024   # columns per silu_and_mul program
SILU_QUANT_BLOCK = 16384   # silu_and_mul_quant: a row up to this long is held in registers


@triton.jit
def _quantize_row(y, cols, mask, row, q_ptr, s_ptr, D, FP8_MAX: tl.constexpr):
    """One row (fp32, as rounded to the model dtype) to fp8 with scale max|y| / FP8_MAX: what
    quantize_per_token (loom.ops) computes, division IEEE-rounded."""
    scale = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0), 1e-12) / FP8_MAX
    tl.store(s_ptr + row, scale)
    q = tl.clamp(tl.div_rn(y, scale), -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * D + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, q_ptr, s_ptr, inner, D, eps,
                     x_s0, x_s1, x_s2, r_s0, r_s1, r_s2,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
                     FP8_MAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    outer, head = row // inner, row % inner
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + outer * x_s0 + head * x_s1 + cols * x_s2, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + outer * r_s0 + head * r_s1 + cols * r_s2, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    normed = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (normed.to(tl.float32) * w).to(x.dtype)
    if QUANT:
        _quantize_row(y.to(tl.float32), cols, mask, row, q_ptr, s_ptr, D, FP8_MAX)
    else:
        tl.store(out_ptr + row * D + cols, y, mask=mask)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """[..., D] as [outer, inner, D], a view where the strides allow (e.g. q heads of a qkv)."""
    return x.reshape(-1, 1, x.shape[-1]) if x.dim() <= 2 else x.reshape(-1, *x.shape[-2:])


def _num_warps(block: int) -> int:
    return min(max(block // 512, 1), 16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_rms_norm(x, None, weight, eps, out, out)
    return out


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   fp8_dtype: torch.dtype) -> QuantizedInput:
    """rms_norm(x) quantized per token to fp8 in the same kernel (x [T, D])."""
    q, scale = _quant_outputs(x, fp8_dtype)
    _launch_rms_norm(x, None, weight, eps, q, q, (q, scale))
    return QuantizedInput(q, scale, x.dtype)


def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       fp8_dtype: torch.dtype) -> tuple[QuantizedInput, torch.Tensor]:
    q, scale = _quant_outputs(x, fp8_dtype)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_rms_norm(x, residual, weight, eps, q, res_out, (q, scale))
    return QuantizedInput(q, scale, x.dtype), res_out


def _quant_outputs(x: torch.Tensor, fp8_dtype: torch.dtype):
    rows = x.numel() // x.shape[-1]
    return (torch.empty(rows, x.shape[-1], dtype=fp8_dtype, device=x.device),
            torch.empty(rows, 1, dtype=torch.float32, device=x.device))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) into new tensors; x and residual are left as they
    are, as the torch twin leaves them (callers may still hold them)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out)
    _launch_rms_norm(x, residual, weight, eps, out, res_out)
    return out, res_out


def _launch_rms_norm(x, residual, weight, eps, out, res_out, quant=None) -> None:
    x3 = _as_3d(x)
    r3 = x3 if residual is None else _as_3d(residual)
    block = triton.next_power_of_2(x.shape[-1])
    q, scale = quant if quant is not None else (out, out)
    _rms_norm_kernel[(x3.shape[0] * x3.shape[1],)](
        x3, r3, weight, out, res_out, q, scale, x3.shape[1], x.shape[-1], eps, *x3.stride(),
        *r3.stride(), HAS_RESIDUAL=residual is not None, BLOCK=block, QUANT=quant is not None,
        FP8_MAX=torch.finfo(q.dtype).max if quant is not None else 0.0,
        num_warps=_num_warps(block))


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK
    cols = c0 + tl.arange(0, BLOCK)
    y = _silu_mul_block(x_ptr, row, x_stride, n, c0, BLOCK)
    tl.store(out_ptr + row * n + cols, y.to(out_ptr.dtype.element_ty), mask=cols < n)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    block = min(SILU_BLOCK, triton.next_power_of_2(n))
    grid = (x2.shape[0], triton.cdiv(n, block))
    _silu_and_mul_kernel[grid](x2, out, x2.stride(0), n, BLOCK=block,
                               num_warps=_num_warps(block))
    return out


@triton.jit
def _silu_and_mul_quant_kernel(x_ptr, q_ptr, s_ptr, x_stride, n, FP8_MAX: tl.constexpr,
                               BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """One row: silu(gate) * up as silu_and_mul rounds it, its max, then the fp8 codes. A row of
    one block stays in registers; longer rows are computed twice rather than kept."""
    row = tl.program_id(0).to(tl.int64)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK)
        y = _silu_mul_block(x_ptr, row, x_stride, n, 0, BLOCK)
        _quantize_row(y, cols, cols < n, row, q_ptr, s_ptr, n, FP8_MAX)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, n, BLOCK):
            y = _silu_mul_block(x_ptr, row, x_stride, n, c0, BLOCK)
            amax = tl.maximum(amax, tl.abs(y))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FP8_MAX
        tl.store(s_ptr + row, scale)
        for c0 in range(0, n, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            y = _silu_mul_block(x_ptr, row, x_stride, n, c0, BLOCK)
            q = tl.clamp(tl.div_rn(y, scale), -FP8_MAX, FP8_MAX)
            tl.store(q_ptr + row * n + cols, q.to(q_ptr.dtype.element_ty), mask=cols < n)


@triton.jit
def _silu_mul_block(x_ptr, row, x_stride, n, c0, BLOCK: tl.constexpr):
    """silu(gate) * up over columns [c0, c0 + BLOCK), rounded as silu_and_mul stores it, in fp32
    (0 past n)."""
    cols = c0 + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype).to(tl.float32)


def silu_and_mul_quant(x: torch.Tensor, fp8_dtype: torch.dtype) -> QuantizedInput:
    """silu_and_mul(x) quantized per token to fp8 in one kernel (a program per row)."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x2.shape[0], n, dtype=fp8_dtype, device=x.device)
    scale = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    block = min(SILU_QUANT_BLOCK, triton.next_power_of_2(n))
    _silu_and_mul_quant_kernel[(x2.shape[0],)](x2, q, scale, x2.stride(0), n,
                                               FP8_MAX=torch.finfo(fp8_dtype).max, BLOCK=block,
                                               ONE_BLOCK=block >= n, num_warps=16 if block >= 8192
                                               else _num_warps(block))
    return QuantizedInput(q, scale, x.dtype)


@triton.jit
def _rotate_heads(ptr, s_h, s_d, heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate [heads, 2 * HALF] at ptr in place: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < HALF)
    first = ptr + h * s_h + d * s_d
    second = first + HALF * s_d
    x1, x2 = _rotated(tl.load(first, mask=mask, other=0.0), tl.load(second, mask=mask, other=0.0),
                      cos, sin)
    tl.store(first, x1, mask=mask)
    tl.store(second, x2, mask=mask)


@triton.jit
def _rotated(x1, x2, cos, sin):
    """(x1 cos - x2 sin, x2 cos + x1 sin) in x's dtype, cos/sin rounded to it first (as the
    torch twin computes with them)."""
    dtype = x1.dtype
    c = cos.to(dtype).to(tl.float32)
    s = sin.to(dtype).to(tl.float32)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return (x1 * c - x2 * s).to(dtype), (x2 * c + x1 * s).to(dtype)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, cache_stride, q_heads, k_heads,
                   q_st, q_sh, q_sd, k_st, k_sh, k_sd, HALF: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    row = cache_ptr + tl.load(pos_ptr + t).to(tl.int64) * cache_stride
    d = tl.arange(0, BLOCK_D)[None, :]
    cos = tl.load(row + d, mask=d < HALF, other=0.0)
    sin = tl.load(row + HALF + d, mask=d < HALF, other=0.0)
    _rotate_heads(q_ptr + t * q_st, q_sh, q_sd, q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr + t * k_st, k_sh, k_sd, k_heads, cos, sin, HALF, BLOCK_HK, BLOCK_D)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
           cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] in place (any strides); returns (q, k)."""
    half = q.shape[-1] // 2
    _rotary_kernel[(q.shape[0],)](
        positions, q, k, cos_sin_cache, cos_sin_cache.stride(0), q.shape[1], k.shape[1],
        *q.stride(), *k.stride(), HALF=half, BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]), BLOCK_D=triton.next_power_of_2(half),
        num_warps=4)
    return q, k


@triton.jit
def _fp8_range(x, scale, fp8_max):
    """x / scale in fp32, clamped to the fp8 range (the cache's dtype rounds it on store)."""
    return tl.minimum(tl.maximum(x.to(tl.float32) / scale, -fp8_max), fp8_max)


@triton.jit
def _rotary_write_kv_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, rope_ptr, rope_stride, cache_ptr,
                            slot_ptr, k_scale, v_scale, fp8_max, q_heads,
                            q_st, q_sh, k_st, k_sh, v_st, v_sh,
                            c_stride_kv, c_stride_block, c_stride_off, c_stride_h,
                            NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                            BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr,
                            USE_GDC: tl.constexpr):
    """One token: q rotated in place; k rotated and v stored at the token's cache slot (none for
    slot -1), quantized as _write_kv_kernel quantizes."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    row = rope_ptr + tl.load(pos_ptr + t).to(tl.int64) * rope_stride
    d = tl.arange(0, BLOCK_D)[None, :]
    cos = tl.load(row + d, mask=d < HALF, other=0.0)
    sin = tl.load(row + HALF + d, mask=d < HALF, other=0.0)
    _rotate_heads(q_ptr + t * q_st, q_sh, 1, q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, BLOCK_HK)[:, None]
    mask = (h < NUM_KV_HEADS) & (d < HALF)
    k = k_ptr + t * k_st + h * k_sh + d
    v = v_ptr + t * v_st + h * v_sh + d
    k1, k2 = _rotated(tl.load(k, mask=mask), tl.load(k + HALF, mask=mask), cos, sin)
    v1, v2 = tl.load(v, mask=mask), tl.load(v + HALF, mask=mask)
    if FP8:
        k1, k2 = _fp8_range(k1, k_scale, fp8_max), _fp8_range(k2, k_scale, fp8_max)
        v1, v2 = _fp8_range(v1, v_scale, fp8_max), _fp8_range(v2, v_scale, fp8_max)
    dst = (cache_ptr + (slot // BLOCK_SIZE) * c_stride_block + (slot % BLOCK_SIZE) * c_stride_off
           + h * c_stride_h + d)
    out_type = cache_ptr.dtype.element_ty
    tl.store(dst, k1.to(out_type), mask=mask)
    tl.store(dst + HALF, k2.to(out_type), mask=mask)
    tl.store(dst + c_stride_kv, v1.to(out_type), mask=mask)
    tl.store(dst + c_stride_kv + HALF, v2.to(out_type), mask=mask)


def rotary_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """rotary(positions, q, k) then write_kv(kv_cache, k, v, slot_mapping, ...), in one kernel:
    q [T, H, D] rotated in place and returned; k is left as it was (only its rotated copy in the
    cache is kept)."""
    num_tokens, num_kv_heads, head_size = k.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert kv_cache.stride(-1) == 1 and head_size % 2 == 0
    fp8 = is_fp8(kv_cache)
    half = head_size // 2
    use_gdc = pdl.enabled(q.device)
    _rotary_write_kv_kernel[(num_tokens,)](
        positions, q, k, v, cos_sin_cache, cos_sin_cache.stride(0), kv_cache, slot_mapping,
        float(k_scale), float(v_scale), float(torch.finfo(kv_cache.dtype).max) if fp8 else 0.0,
        q.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *kv_cache.stride()[:4], NUM_KV_HEADS=num_kv_heads, HALF=half,
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(half), BLOCK_SIZE=kv_cache.shape[2], FP8=fp8,
        USE_GDC=use_gdc, num_warps=4, **pdl.launch_kwargs(use_gdc))
    return q


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, k_scale, v_scale, fp8_max,
                     k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                     c_stride_kv, c_stride_block, c_stride_off, c_stride_h,
                     NUM_KV_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, HEADS_PAD: tl.constexpr,
                     HEAD_PAD: tl.constexpr, FP8: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_SIZE)
    k = tl.load(k_ptr + token * k_stride_t + h * k_stride_h + d, mask=mask)
    v = tl.load(v_ptr + token * v_stride_t + h * v_stride_h + d, mask=mask)
    if FP8:
        k, v = _fp8_range(k, k_scale, fp8_max), _fp8_range(v, v_scale, fp8_max)
    dst = (cache_ptr + (slot // BLOCK_SIZE) * c_stride_block + (slot % BLOCK_SIZE) * c_stride_off
           + h * c_stride_h + d)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + c_stride_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(kv_cache, k, v, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store k/v [T, KVH, D] at flat slots (block * block_size + offset); slot -1 is skipped.
    An fp8 cache gets x / scale clamped to the fp8 range, as the torch twin stores it."""
    num_tokens, num_kv_heads, head_size = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1
    fp8 = is_fp8(kv_cache)
    fp8_max = torch.finfo(kv_cache.dtype).max if fp8 else 0.0
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping, float(k_scale), float(v_scale), float(fp8_max),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *kv_cache.stride()[:4], NUM_KV_HEADS=num_kv_heads, HEAD_SIZE=head_size,
        BLOCK_SIZE=kv_cache.shape[2], HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_PAD=triton.next_power_of_2(head_size), FP8=fp8)
