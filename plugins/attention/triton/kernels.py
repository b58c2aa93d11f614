"""Triton kernels for paged attention over a [2, num_blocks, block_size, num_kv_heads, head_size]
KV cache: attention for mixed batches, and split-KV decode with its reduction (the cache write
is the fused ops plugin's ``write_kv`` kernel, shared with the other backends).

An fp8 cache is read as fp8 and converted exactly (every e4m3 value is an fp16 and a bf16
value). For bf16/fp16 queries and an e4m3 cache the tiles' dots run in fp16, the query converted
once: e4m3 -> fp16 is one instruction per two values on sm89+, where e4m3 -> bf16 goes through
more (on the H200 this made fp8 decode 1.4x faster at 256 x 8k; FP8_CONVERSION = "cast" keeps
the conversion to the query's dtype, for comparison). The scales are folded in, k_scale into the
softmax scale and v_scale into the output, which equals dequantizing each value to fp32 * scale.

Rows of a program's query tile are (token, query head) pairs of one KV head's group, so every
K/V tile is loaded once per group. Softmax runs online in base 2, accumulating in fp32.
Plain Triton 3.x language only (run on triton 3.6 on an H200 and 3.9's interpreter); the decode
kernels launch as programmatic dependents where loom.pdl.enabled says so.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loom import pdl

LOG2_E = 1.4426950408889634
FP16_QUERY_DTYPES = (torch.bfloat16, torch.float16)
FP8_CONVERSION = "fp16"   # or "cast" (see the module docstring)


@triton.jit
def _compute_queries(q, FP16: tl.constexpr):
    """The queries in the dtype the tiles' dots run in (fp16 when an fp8 cache is read as fp16)."""
    if FP16:
        out = q.to(tl.float16)
    else:
        out = q
    return out


@triton.jit
def _attend_tile(acc, m_i, l_i, q, cache_ptr, block_table_ptr, kv_head, start, kv_end, q_pos,
                 scale_log2, c_stride_kv, c_stride_block, c_stride_off, c_stride_h,
                 HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 TILE: tl.constexpr, MASK: tl.constexpr):
    """Fold keys [start, start + TILE) ∩ [0, kv_end), causal to row positions q_pos, into the
    online-softmax state (acc, m_i, l_i) of the query rows q [BLOCK_M, HEAD_PAD]. Without MASK
    the caller promises every key of the tile is below kv_end and visible to every row."""
    n = start + tl.arange(0, TILE)
    n_ok = (n < kv_end) if MASK else tl.full([TILE], 1, tl.int1)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_SIZE
    block = tl.load(block_table_ptr + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    offs = block * c_stride_block + (n % BLOCK_SIZE) * c_stride_off + kv_head * c_stride_h
    k = tl.load(cache_ptr + offs[None, :] + d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                other=0.0).to(q.dtype)
    v = tl.load(cache_ptr + c_stride_kv + offs[:, None] + d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)
    s = tl.dot(q, k, input_precision="ieee") * scale_log2
    if MASK:
        s = tl.where(n_ok[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with no visible key yet keep m = -inf; subtracting 0 instead avoids inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _attend(q, cache_ptr, block_table_ptr, kv_head, kv_start, full_end, kv_end, q_pos,
            scale_log2, v_scale, c_stride_kv, c_stride_block, c_stride_off, c_stride_h,
            ROWS: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
            BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
    """Attention state (acc, m, l) of the rows q over keys [kv_start, kv_end), causal to q_pos;
    keys below full_end (kv_start plus whole tiles) are visible to every row and go unmasked.
    acc comes out multiplied by v_scale (the V scale of an fp8 cache, else 1). Tiles convert to
    q's dtype (fp16 when an fp8 cache is read as fp16)."""
    acc = tl.zeros([ROWS, HEAD_PAD], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(kv_start, full_end, TILE):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, cache_ptr, block_table_ptr, kv_head,
                                     start, kv_end, q_pos, scale_log2, c_stride_kv,
                                     c_stride_block, c_stride_off, c_stride_h,
                                     HEAD_SIZE, HEAD_PAD, BLOCK_SIZE, TILE, False)
    for start in range(full_end, kv_end, TILE):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, cache_ptr, block_table_ptr, kv_head,
                                     start, kv_end, q_pos, scale_log2, c_stride_kv,
                                     c_stride_block, c_stride_off, c_stride_h,
                                     HEAD_SIZE, HEAD_PAD, BLOCK_SIZE, TILE, True)
    return acc * v_scale, m_i, l_i


@triton.jit
def _find_seq(query_start_ptr, first_seq, num_seqs, base, pid, BLOCK_Q: tl.constexpr):
    """The sequence owning query block ``pid``: sequence i >= first_seq owns the programs from
    (query_start[i] - base) // BLOCK_Q + i - first_seq (at least as many as its blocks)."""
    lo = first_seq
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if (tl.load(query_start_ptr + mid) - base) // BLOCK_Q + mid - first_seq <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Integer arguments that change from step to step are not specialized on (== 1, % 16), so mixed
# steps do not compile new variants of the kernel as the batch changes.
@triton.jit(do_not_specialize=["first_seq", "num_seqs", "bt_stride"])
def _prefill_attention(out_ptr, q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr,
                       query_start_ptr, first_seq, num_seqs, scale_log2, v_scale,
                       q_stride_t, q_stride_h, o_stride_t, o_stride_h, bt_stride,
                       c_stride_kv, c_stride_block, c_stride_off, c_stride_h,
                       GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                       TILE: tl.constexpr, FP16: tl.constexpr):
    """Grid (query_blocks, num_kv_heads) over sequences first_seq..num_seqs-1: each program
    takes BLOCK_Q query tokens x GROUP heads of one sequence."""
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    base = tl.load(query_start_ptr + first_seq)
    seq = _find_seq(query_start_ptr, first_seq, num_seqs, base, pid, BLOCK_Q)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    q_block = pid - ((q_start - base) // BLOCK_Q + seq - first_seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    m = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + m // GROUP                 # token index within the chunk
    head = kv_head * GROUP + m % GROUP
    row_ok = (m // GROUP < BLOCK_Q) & (tok < q_len)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_SIZE
    q_offs = (q_start + tok)[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :]
    q = _compute_queries(tl.load(q_ptr + q_offs, mask=row_ok[:, None] & d_ok[None, :],
                                 other=0.0), FP16)

    q_pos = context_len + tok
    kv_end = tl.minimum(seq_len, context_len + (q_block + 1) * BLOCK_Q)
    # Keys before the block's first query are visible to all its rows.
    full_end = (context_len + q_block * BLOCK_Q) // TILE * TILE
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * bt_stride
    acc, m_i, l_i = _attend(q, cache_ptr, block_table_ptr, kv_head, 0, full_end, kv_end, q_pos,
                            scale_log2, v_scale, c_stride_kv, c_stride_block, c_stride_off,
                            c_stride_h, BLOCK_M, HEAD_SIZE, HEAD_PAD, BLOCK_SIZE, TILE)
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_offs = (q_start + tok)[:, None] * o_stride_t + head[:, None] * o_stride_h + d[None, :]
    tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["bt_stride"])
def _decode_attention(out_ptr, part_out_ptr, part_lse_ptr, q_ptr, cache_ptr, block_tables_ptr,
                      seq_lens_ptr, scale_log2, v_scale,
                      q_stride_t, q_stride_h, o_stride_t, o_stride_h, bt_stride,
                      c_stride_kv, c_stride_block, c_stride_off, c_stride_h,
                      NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr,
                      HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
                      TILE: tl.constexpr, NUM_SPLITS: tl.constexpr, FP16: tl.constexpr,
                      USE_GDC: tl.constexpr):
    """Grid (num_seqs, num_kv_heads, NUM_SPLITS): one query token x GROUP heads over one split
    of the keys. With one split the result goes to out; otherwise each split writes its
    normalized partial output and base-2 log-sum-exp for _reduce_splits."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, TILE), NUM_SPLITS)
    kv_start = split * tiles_per_split * TILE
    kv_end = tl.minimum(kv_start + tiles_per_split * TILE, seq_len)

    h = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + h
    h_ok = h < GROUP
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_SIZE
    mask = h_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS > 1:
        if kv_start >= seq_len:
            # An empty split (a context shorter than the splits): only its log-sum-exp, -inf,
            # which _reduce_splits weighs by zero without reading its partial output.
            row = (seq * NUM_HEADS + head) * NUM_SPLITS + split
            tl.store(part_lse_ptr + row, tl.full([BLOCK_H], float("-inf"), tl.float32),
                     mask=h_ok)
            return
    q = _compute_queries(tl.load(q_ptr + seq * q_stride_t + head[:, None] * q_stride_h +
                                 d[None, :], mask=mask, other=0.0), FP16)

    q_pos = tl.zeros([BLOCK_H], dtype=tl.int32) + seq_len - 1
    full_end = kv_start + (kv_end - kv_start) // TILE * TILE
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * bt_stride
    acc, m_i, l_i = _attend(q, cache_ptr, block_table_ptr, kv_head, kv_start, full_end, kv_end,
                            q_pos, scale_log2, v_scale, c_stride_kv, c_stride_block,
                            c_stride_off, c_stride_h, BLOCK_H, HEAD_SIZE, HEAD_PAD, BLOCK_SIZE,
                            TILE)
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:
        o_offs = seq * o_stride_t + head[:, None] * o_stride_h + d[None, :]
        tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        row = (seq * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * HEAD_SIZE + d[None, :], acc, mask=mask)
        # l_i >= 1 once a key is seen (its largest term is 1); an empty split keeps m_i = -inf.
        tl.store(part_lse_ptr + row, m_i + tl.log2(tl.maximum(l_i, 1.0)), mask=h_ok)


@triton.jit
def _reduce_splits(out_ptr, part_out_ptr, part_lse_ptr, o_stride_t, o_stride_h,
                   NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, USE_GDC: tl.constexpr):
    """Grid (num_seqs, num_heads): combine the splits' partial outputs by their weights."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_SIZE
    row = (seq * NUM_HEADS + head) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + row)
    lse_max = tl.max(lse, 0)
    # Empty splits have lse = -inf and weigh nothing; an empty sequence gives zeros.
    w = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    part = tl.load(part_out_ptr + row[:, None] * HEAD_SIZE + d[None, :],
                   mask=(lse > float("-inf"))[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, 0)
    acc = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * o_stride_t + head * o_stride_h + d, acc.to(out_ptr.dtype.element_ty),
             mask=d_ok)


def reads_fp8_as_fp16(kv_cache, q) -> bool:
    """Whether the kernels convert this cache to fp16 and run the dots in fp16: an e4m3 cache
    and bf16/fp16 queries (FP8_CONVERSION "fp16")."""
    return (kv_cache.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
            and q.dtype in FP16_QUERY_DTYPES and FP8_CONVERSION == "fp16")


def _cache_strides(kv_cache):
    assert kv_cache.stride(-1) == 1, "the KV cache's head dimension must be contiguous"
    return kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)


def _pad(n: int) -> int:
    """Power-of-two extent (at least 16, the smallest tl.dot operand) covering n."""
    return max(16, triton.next_power_of_2(n))


def prefill_attention(out, q, kv_cache, block_tables, seq_lens, query_start_loc, first_seq: int,
                      num_seqs: int, num_tokens: int, scale: float, block_m: int, tile: int,
                      num_warps: int, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Sequences first_seq..num_seqs-1, holding num_tokens query tokens: each query chunk,
    causal, over its cached prefix and itself. k_scale/v_scale: an fp8 cache's scales."""
    _, num_heads, head_size = q.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (num_tokens // block_q + num_seqs - first_seq, num_kv_heads)
    _prefill_attention[grid](
        out, q, kv_cache, block_tables, seq_lens, query_start_loc, first_seq, num_seqs,
        scale * k_scale * LOG2_E, float(v_scale), q.stride(0), q.stride(1), out.stride(0),
        out.stride(1), block_tables.stride(0), *_cache_strides(kv_cache), GROUP=group,
        HEAD_SIZE=head_size, HEAD_PAD=_pad(head_size), BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_M=block_m, BLOCK_Q=block_q, TILE=tile, FP16=reads_fp8_as_fp16(kv_cache, q),
        num_warps=num_warps)


def decode_attention(out, q, kv_cache, block_tables, seq_lens, num_seqs: int, scale: float,
                     num_splits: int, tile: int, num_warps: int, k_scale: float = 1.0,
                     v_scale: float = 1.0, num_stages: int = 3) -> None:
    """Sequences 0..num_seqs-1, decodes (token i is sequence i's query), each one's keys cut
    into num_splits (a power of two) ranges. The grid depends only on num_seqs and num_splits.
    k_scale/v_scale: an fp8 cache's scales."""
    _, num_heads, head_size = q.shape
    num_kv_heads = kv_cache.shape[3]
    part_out = part_lse = out
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_size, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
    use_gdc = pdl.enabled(q.device)
    _decode_attention[(num_seqs, num_kv_heads, num_splits)](
        out, part_out, part_lse, q, kv_cache, block_tables, seq_lens, scale * k_scale * LOG2_E,
        float(v_scale), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), *_cache_strides(kv_cache), NUM_HEADS=num_heads,
        GROUP=num_heads // num_kv_heads, HEAD_SIZE=head_size, HEAD_PAD=_pad(head_size),
        BLOCK_SIZE=kv_cache.shape[2], BLOCK_H=_pad(num_heads // num_kv_heads), TILE=tile,
        NUM_SPLITS=num_splits, FP16=reads_fp8_as_fp16(kv_cache, q), USE_GDC=use_gdc,
        num_warps=num_warps, num_stages=num_stages, **pdl.launch_kwargs(use_gdc))
    if num_splits > 1:
        _reduce_splits[(num_seqs, num_heads)](
            out, part_out, part_lse, out.stride(0), out.stride(1), NUM_HEADS=num_heads,
            HEAD_SIZE=head_size, HEAD_PAD=triton.next_power_of_2(head_size),
            NUM_SPLITS=num_splits, USE_GDC=use_gdc, **pdl.launch_kwargs(use_gdc))
