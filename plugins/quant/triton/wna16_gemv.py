"""W4A16/W8A16 GEMV: y = x @ W^T (+ bias) for a few rows of x (decode), W int4/int8 in the layout
of ``schemes/wna16.py``: int32 [N, K/pf] (the code of input k in bits (k % pf) * bits of word
k // pf), scales and zeros [N, G] (one group per step of group_size inputs), optional perm [K].

Each program owns BLOCK_N rows of W and a chunk of K, which it streams in BLOCK_K steps (Triton
pipelines the loads through shared memory, num_stages deep). A step's [BLOCK_N, BLOCK_K/pf] words
are taken apart into pf planes, plane i holding the codes of the inputs k = pf*j + i, and
dequantized without int-to-float conversions (Hopper issues those at a fraction of the FMA rate): a
code q at bit s of the low or high half of a word, OR-ed into the float 2^23 (0x4B000000), reads as
the float 2^23 + q*2^s, so one AND and one FMA (times 2^-s, minus 2^(23-s) + zero) give q - zero
exactly (zeros are whole numbers in every format). One row of x (M = 1) meets the planes in FMAs;
several rows (padded to 16) in one tensor-core dot per plane, against the stride-pf slice of x that
plane multiplies. The scale multiplies once per step when a step lies in one group, else per word.
With a perm (act order sorted at load time), x is read through it. One row of bf16/fp16 x over
int4 on an NVIDIA GPU takes a PTX path instead (_int4_dot): two codes per fp16x2 instruction, x
scaled into fp16's range by one power of two per K chunk; the fp32 planes are its reference twin
(and what triton's interpreter runs).

Splitting K gives the layers with few row blocks enough programs to fill the GPU: every split
stores its fp32 partial sums, and the last split of a row block to finish (an atomic counter per
block, which it then resets to 0) adds them in split order, so the result does not depend on
timing. Grid, constexprs and allocations depend only on shapes: safe to capture in a CUDA graph.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loom.plugins.quant.triton.split_k import num_sms

MAX_M = 16        # rows of x the GEMV takes; a tensor-core dot pads them to 16
DOT_ROWS = 16
MIN_DOT = 16      # the smallest N and K of a tl.dot the compiler takes (the interpreter takes less)
# The float 2^23, passed as an argument rather than a constant: LLVM would otherwise refold
# (word | 2^23) & (mask | 2^23) into a two-constant LOP3 plus a register move per code.
MAGIC = 0x4B000000
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class WNA16GemvConfig:
    """block_n rows of W per program, block_k inputs (codes) per step; split_k 0 lets the
    launcher split K until the grid holds programs_per_sm programs per SM (at most one split per
    K step)."""
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 0
    programs_per_sm: int = 2
    fast_dequant: bool = True


def default_config(bits: int, group_size: int) -> WNA16GemvConfig:
    """Chosen from the sm_90 SASS (no spills, fewest instructions per packed word: int4 34-38 for
    one row of x, 39 for a dot, int8 19-22), not yet timed on a GPU: 128 inputs per step, 256
    for int4 with groups of 256 or more."""
    return WNA16GemvConfig(block_k=256 if bits == 4 and group_size >= 256 else 128)


@triton.jit
def _load_plane(x_ptr, perm_ptr, rm, rk, M, K, stride_xm, HAS_PERM: tl.constexpr,
                EVEN: tl.constexpr):
    """x[rows < M, rk] as [ROWS, len(rk)], through perm when there is one."""
    k_ok = (rk < K) | EVEN
    if HAS_PERM:
        rk = tl.load(perm_ptr + rk, mask=k_ok, other=0)
    mask = (rm < M)[:, None] & k_ok[None, :]
    return tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0)


# int4 codes to fp16 in PTX, for one row of x over bf16/fp16 x (CUDA only: the interpreter runs no
# asm). A LOP3 ORs the nibbles at bits 0 and 16 into the fp16 pair 1024 + q (exponent 0x6400); the
# nibbles at bits 4 and 20 read as 1024 + 16q, which one FMA by 1/16 brings down; one shift by 8
# gives the other four. Adding -(1024 + zero), resp. FMA-ing -(64 + zero), leaves q - zero exactly.
# The word's four pairs meet its inputs (x[k + p], x[k + p + 4]) in fp16x2 FMAs; the two lanes of
# the sum go to fp32. 17 instructions per word where the fp32 planes take 37 (sm_90 SASS).
_INT4_DOT_ASM = tl.constexpr("""{
.reg .b32 w, t0, t1, t2, t3, sixteenth;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 sixteenth, 0x2C002C00;
lop3.b32 t0, $1, 0x000f000f, 0x64006400, 0xea;
lop3.b32 t1, $1, 0x00f000f0, 0x64006400, 0xea;
shr.u32 w, $1, 8;
lop3.b32 t2, w, 0x000f000f, 0x64006400, 0xea;
lop3.b32 t3, w, 0x00f000f0, 0x64006400, 0xea;
add.rn.f16x2 t0, t0, $2;
fma.rn.f16x2 t1, t1, sixteenth, $3;
add.rn.f16x2 t2, t2, $2;
fma.rn.f16x2 t3, t3, sixteenth, $3;
mul.rn.f16x2 t0, t0, $4;
fma.rn.f16x2 t0, t1, $5, t0;
fma.rn.f16x2 t0, t2, $6, t0;
fma.rn.f16x2 t0, t3, $7, t0;
mov.b32 {lo, hi}, t0;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}""")


@triton.jit
def _half2(lo, hi):
    """fp32 lo, hi rounded to fp16 into the low and high halves of one 32-bit register."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _x_scale(x_ptr, perm_ptr, k_start, k_end, K, BLOCK_K: tl.constexpr, HAS_PERM: tl.constexpr,
             EVEN: tl.constexpr):
    """The power of two that brings the largest |x| of the inputs [k_start, k_end) to [256, 512),
    and its inverse: a word's fp16 sum (at most 4 * 15 * 512) cannot overflow, and inputs 2^22
    below the largest still convert to normal fp16 numbers."""
    top = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = (rk < K) | EVEN
        if HAS_PERM:
            rk = tl.load(perm_ptr + rk, mask=k_ok, other=0)
        x = tl.load(x_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        top = tl.maximum(top, tl.abs(x))
    exponent = tl.minimum(tl.maximum(tl.max(top).to(tl.int32, bitcast=True) >> 23, 9), 254)
    up = ((262 - exponent) << 23).to(tl.float32, bitcast=True)      # 2^(135 - exponent)
    down = ((exponent - 8) << 23).to(tl.float32, bitcast=True)      # 2^(exponent - 135)
    return up, down


@triton.jit
def _x_pairs(x_ptr, perm_ptr, rm, rw, M, K, k_words, stride_xm, up, HAS_PERM: tl.constexpr,
             EVEN: tl.constexpr):
    """The 8 inputs of each word w (k = 8w + i) times up, as four fp16x2 pairs
    (x[k + p], x[k + p + 4]). Without a perm, read as two 8-byte loads per word."""
    if HAS_PERM:
        x0 = _load_plane(x_ptr, perm_ptr, rm, rw * 8, M, K, stride_xm, True, EVEN).to(tl.float32)
        x1 = _load_plane(x_ptr, perm_ptr, rm, rw * 8 + 1, M, K, stride_xm, True, EVEN).to(tl.float32)
        x2 = _load_plane(x_ptr, perm_ptr, rm, rw * 8 + 2, M, K, stride_xm, True, EVEN).to(tl.float32)
        x3 = _load_plane(x_ptr, perm_ptr, rm, rw * 8 + 3, M, K, stride_xm, True, EVEN).to(tl.float32)
        x4 = _load_plane(x_ptr, perm_ptr, rm, rw * 8 + 4, M, K, stride_xm, True, EVEN).to(tl.float32)
        x5 = _load_plane(x_ptr, perm_ptr, rm, rw * 8 + 5, M, K, stride_xm, True, EVEN).to(tl.float32)
        x6 = _load_plane(x_ptr, perm_ptr, rm, rw * 8 + 6, M, K, stride_xm, True, EVEN).to(tl.float32)
        x7 = _load_plane(x_ptr, perm_ptr, rm, rw * 8 + 7, M, K, stride_xm, True, EVEN).to(tl.float32)
    else:
        quads = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True) + (rw * 2)[None, :]
        w_ok = ((rw < k_words) | EVEN)[None, :]
        low = tl.load(quads, mask=w_ok, other=0)
        high = tl.load(quads + 1, mask=w_ok, other=0)
        x0, x1 = _halves(low.to(tl.int32), x_ptr.dtype.element_ty)
        x2, x3 = _halves((low >> 32).to(tl.int32), x_ptr.dtype.element_ty)
        x4, x5 = _halves(high.to(tl.int32), x_ptr.dtype.element_ty)
        x6, x7 = _halves((high >> 32).to(tl.int32), x_ptr.dtype.element_ty)
    return (_half2(x0 * up, x4 * up), _half2(x1 * up, x5 * up), _half2(x2 * up, x6 * up),
            _half2(x3 * up, x7 * up))


@triton.jit
def _halves(pair, dtype: tl.constexpr):
    """The two bf16/fp16 numbers in an int32 (low half first) as float32."""
    if dtype == tl.bfloat16:
        return (pair << 16).to(tl.float32, bitcast=True), \
            (pair & -65536).to(tl.float32, bitcast=True)
    else:
        return (pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def _int4_dot(words, zero, x01, x23, x45, x67):
    """Per word: sum over its 8 codes of (q - zero) * x, in fp16x2 (see _INT4_DOT_ASM), as fp32."""
    minus_1024 = _half2(-1024.0 - zero, -1024.0 - zero)
    minus_64 = _half2(-64.0 - zero, -64.0 - zero)
    return tl.inline_asm_elementwise(_INT4_DOT_ASM, "=f,r,r,r,r,r,r,r",
                                     [words, minus_1024, minus_64, x01, x23, x45, x67],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _step(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, acc, rm, rn, k0, magic, x_up, M, N, K, k_words,
          stride_xm, stride_wn, stride_sn, BITS: tl.constexpr, GROUP: tl.constexpr,
          ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          SCALE_PER_STEP: tl.constexpr, HAS_PERM: tl.constexpr, EVEN: tl.constexpr,
          FAST: tl.constexpr):
    """acc (+)= the BLOCK_K inputs from k0 on: [BLOCK_N, BLOCK_K/pf] for one row of x (summed at
    the end), [ROWS, BLOCK_N] for a dot. FAST: int4, one row, through _int4_dot."""
    PACK: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PACK // 2
    WORDS: tl.constexpr = BLOCK_K // PACK
    MASK: tl.constexpr = (1 << BITS) - 1
    rw = tl.multiple_of(k0 // PACK, WORDS) + tl.arange(0, WORDS)
    n_ok = (rn < N) | EVEN
    w_ok = n_ok[:, None] & ((rw < k_words) | EVEN)[None, :]
    words = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rw[None, :], mask=w_ok,
                    other=0)
    if SCALE_PER_STEP:
        at = rn * stride_sn + k0 // GROUP
        scale = tl.load(s_ptr + at, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        zero = tl.load(z_ptr + at, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    else:
        at = rn[:, None] * stride_sn + (rw * PACK // GROUP)[None, :]
        scale = tl.load(s_ptr + at, mask=w_ok, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + at, mask=w_ok, other=0.0).to(tl.float32)
    if FAST:
        x01, x23, x45, x67 = _x_pairs(x_ptr, perm_ptr, rm, rw, M, K, k_words, stride_xm, x_up,
                                      HAS_PERM, EVEN)
        return acc + scale * _int4_dot(words, zero, x01, x23, x45, x67)
    low = words | magic
    high = ((words >> 16) & 0xFFFF) | magic
    if ROWS == 1:
        part = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    else:
        part = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for i in tl.static_range(PACK):
        shift = BITS * (i % HALF)
        half = low if i < HALF else high
        code = (half & ((MASK << shift) | magic)).to(tl.float32, bitcast=True)
        q = code * (1.0 / (1 << shift)) - (zero + 8388608.0 / (1 << shift))   # q - zero, exact
        x = _load_plane(x_ptr, perm_ptr, rm, rw * PACK + i, M, K, stride_xm, HAS_PERM, EVEN)
        if ROWS == 1:
            part += x.to(tl.float32) * q
        elif SCALE_PER_STEP:
            part = tl.dot(x, tl.trans(q.to(x.dtype)), part, input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans((q * scale).to(x.dtype)), part, input_precision="ieee")
    if ROWS == 1:
        return acc + scale * part
    elif SCALE_PER_STEP:
        return acc + part * tl.trans(scale)
    else:
        return acc + part


@triton.jit
def _store(out, bias_ptr, y_ptr, rm, rn, N, mask, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, y_ptr, part_ptr, count_ptr,
                 M, N, K, k_words, k_chunk, splits, magic, stride_xm, stride_wn, stride_sn,
                 stride_ym, BITS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                 SCALE_PER_STEP: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                 EVEN: tl.constexpr, SPLIT: tl.constexpr, FAST: tl.constexpr):
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, ROWS)
    if ROWS == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K // (32 // BITS)], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    k_start = tl.program_id(1) * k_chunk
    k_end = tl.minimum(k_start + k_chunk, K)
    x_up = 1.0
    x_down = 1.0
    if FAST:
        x_up, x_down = _x_scale(x_ptr, perm_ptr, k_start, k_end, K, BLOCK_K, HAS_PERM, EVEN)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
        acc = _step(x_ptr, w_ptr, s_ptr, z_ptr, perm_ptr, acc, rm, rn, k0, magic, x_up, M, N, K,
                    k_words, stride_xm, stride_wn, stride_sn, BITS, GROUP, ROWS, BLOCK_N,
                    BLOCK_K, SCALE_PER_STEP, HAS_PERM, EVEN, FAST)
    if ROWS == 1:
        out = (tl.sum(acc, 1) * x_down)[None, :]
    else:
        out = acc
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT:
        at = rm[:, None] * N + rn[None, :]
        tl.store(part_ptr + tl.program_id(1) * M * N + at, out, mask=mask)
        tl.debug_barrier()                   # every thread's partials before the release
        if tl.atomic_add(count_ptr + pid_n, 1) == splits - 1:     # acq_rel: the last split
            out = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for split in range(splits):
                out += tl.load(part_ptr + split * M * N + at, mask=mask, other=0.0,
                               cache_modifier=".cg")
            _store(out, bias_ptr, y_ptr, rm, rn, N, mask, stride_ym, HAS_BIAS)
            tl.atomic_xchg(count_ptr + pid_n, 0)
    else:
        _store(out, bias_ptr, y_ptr, rm, rn, N, mask, stride_ym, HAS_BIAS)


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 buffer of at least n counters, kept per device: each launch leaves its
    counters at 0 again (launches on one stream run one after the other). Outgrown buffers are
    kept too, for the graphs captured with them."""
    kept = _COUNTERS.setdefault(device, [])
    if not kept or kept[-1].numel() < n:
        kept.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return kept[-1]


def scale_per_step(group_size: int, K: int, block_k: int) -> bool:
    """Whether every step of block_k inputs lies in one group (else scales are read per word)."""
    return group_size >= K or group_size % block_k == 0


def fast_dequant_applies(x: torch.Tensor, bits: int) -> bool:
    """Whether the PTX int4 path (_int4_dot) can take x: one row of bf16/fp16 x, compiled for an
    NVIDIA GPU (not triton's interpreter, not ROCm); float32 x keeps its exact fp32 planes."""
    return (bits == 4 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and x.data_ptr() % 8 == 0 and x.is_cuda and torch.version.hip is None
            and os.environ.get("TRITON_INTERPRET", "0") != "1")


def gemv_supported(x: torch.Tensor, w_q: torch.Tensor, bits: int, group_size: int,
                   g_idx: torch.Tensor | None) -> bool:
    """Shapes and dtypes the GEMV takes: up to MAX_M rows of x, groups of whole words, and no
    g_idx (act order sorted into a perm is fine)."""
    pack = 32 // bits
    return (x.dim() == 2 and 1 <= x.shape[0] <= MAX_M and x.dtype in DTYPES
            and x.stride(1) == 1 and x.shape[1] == w_q.shape[1] * pack and g_idx is None
            and (group_size >= x.shape[1] or group_size % pack == 0))


def _splits(blocks: int, K: int, block_k: int, cfg: WNA16GemvConfig, device) -> int:
    k_steps = triton.cdiv(K, block_k)
    if cfg.split_k:
        return max(1, min(cfg.split_k, k_steps))
    return max(1, min(triton.cdiv(cfg.programs_per_sm * num_sms(device), blocks), k_steps))


def wna16_gemv(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               perm: torch.Tensor | None, bits: int, group_size: int,
               bias: torch.Tensor | None = None,
               config: WNA16GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N] in x's dtype, M <= MAX_M; group_size is K for one group
    per row of W."""
    M, K = x.shape
    if not 1 <= M <= MAX_M:
        raise ValueError(f"wna16_gemv takes 1 to {MAX_M} rows of x, got {M}")
    if bits not in (4, 8):
        raise ValueError(f"wna16_gemv: bits must be 4 or 8, got {bits}")
    pack = 32 // bits
    if K != w_q.shape[1] * pack:
        raise ValueError(f"wna16_gemv: x has {K} inputs, w_q packs {w_q.shape[1] * pack}")
    if group_size < K and group_size % pack:
        raise ValueError(f"wna16_gemv: group size {group_size} splits the {pack}-code words")
    N = w_q.shape[0]
    cfg = config or default_config(bits, group_size)
    if M > 1 and (cfg.block_k // pack < MIN_DOT or cfg.block_n < MIN_DOT):
        raise ValueError(f"wna16_gemv: config block_n {cfg.block_n}, block_k {cfg.block_k} makes "
                         f"dots of {cfg.block_n} x {cfg.block_k // pack} for {M} rows of x and "
                         f"{bits}-bit codes; tensor-core dots need both >= {MIN_DOT} "
                         f"(block_k >= {MIN_DOT * pack})")
    blocks = triton.cdiv(N, cfg.block_n)
    splits = _splits(blocks, K, cfg.block_k, cfg, x.device)
    k_chunk = triton.cdiv(triton.cdiv(K, cfg.block_k), splits) * cfg.block_k
    splits = triton.cdiv(K, k_chunk)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else y
    counters = _counters(blocks, x.device) if splits > 1 else y
    _gemv_kernel[(blocks, splits)](
        x, w_q, scales, zeros, y if perm is None else perm, y if bias is None else bias, y, part,
        counters, M, N, K, K // pack, k_chunk, splits, MAGIC, x.stride(0),
        w_q.stride(0), scales.stride(0), y.stride(0), BITS=bits, GROUP=min(group_size, K),
        ROWS=1 if M == 1 else DOT_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        STAGES=cfg.num_stages, SCALE_PER_STEP=scale_per_step(group_size, K, cfg.block_k),
        HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
        EVEN=N % cfg.block_n == 0 and K % cfg.block_k == 0, SPLIT=splits > 1,
        FAST=cfg.fast_dequant and fast_dequant_applies(x, bits), num_warps=cfg.num_warps)
    return y
