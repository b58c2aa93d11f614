"""The int4 GEMV of csrc/wna16_gemv.cu for 1 to 4 rows of bf16/fp16 x on NVIDIA GPUs, in the
layout of ``schemes/wna16.py``; its twin is the Triton GEMV (triton/wna16_gemv.py).

``int4_gemv`` runs it when ``applies`` says it takes the call; the first call builds it (about a
minute, then cached on disk). Where it cannot be built, one warning says why and ``applies``
answers False from then on, so the Triton GEMV runs. ``LOOM_NATIVE_KERNELS=0`` turns it off.

x may come as a FusedInput (loom.quant): the norm (with the residual add) or SiLU-and-mul before
the linear, applied by the kernel as it stages x. On sm_90+ the kernel is launched as a
programmatic dependent (PDL), overlapping its first weight loads with the kernel before it.
``LOOM_NATIVE_FUSED_INPUT=0`` declines FusedInputs (the model runs the ops itself) and
``LOOM_NATIVE_PDL=0`` launches plainly: both for measuring what each brings.

``epilogue="silu_and_mul"`` returns silu(z[:, :N/2]) * z[:, N/2:] of z = x @ W^T (+ bias), the
gate|up projection and its activation in one kernel (``LOOM_NATIVE_FUSED_OUTPUT=0`` declines
it: the next linear's kernel applies the activation as its input instead).

Measurement knobs (read at each call, so a graph captured after setting them uses them):
``LOOM_NATIVE_GEMV_CONFIG="NxK=R/U/B;..."`` replaces the default config of one row of x for W
[N, K] (rows per warp, loads per lane, blocks per SM); ``LOOM_NATIVE_GEMV_FLAGS=name,...`` turns
on kernel variants (FLAGS; sum_by_last_blocks changed nothing in runs 68 and 73).
``LOOM_NATIVE_TRACE=1`` loads the tracing build (-DLOOM_GEMV_TRACE),
whose blocks record their timeline between ``trace_start`` and ``trace_stop``
(benchmarks/gemv_trace.py).

``NativeGemvConfig(mma=True)`` takes the tensor-core path for one row of x (K a multiple of 128,
groups of a multiple of 128 inputs or one group): 16 rows of W a tile, the dot products as
m16n8k16 MMAs, about 40% fewer instructions per byte of W than the lanes' fp16x2 FMAs. On the
H200 it made the batch-1 GPTQ decode step slower (run 66: 2.59 ms against 2.20 with the lanes'
path, run 61), so the defaults take it only with ``LOOM_NATIVE_MMA=1``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass

import torch

from loom.plugins.quant.triton.split_k import num_sms
from loom.quant import FusedInput

logger = logging.getLogger("loom")

MAX_M = 4
CHUNK = 32        # inputs per 16-byte load of W
DTYPES = (torch.bfloat16, torch.float16)
PROLOGUES = {"rms_norm": 1, "silu_and_mul": 2}      # the kernel's codes (0: plain x)
FLAGS = {"sum_by_last_blocks": 1}                   # Shape::flags bits (csrc/wna16_gemv.cu)
EPILOGUES = {"silu_and_mul": 1}                     # (0: plain y)


BUILT = {1: {(1, 4), (2, 4), (1, 2), (1, 8), (2, 2), (2, 8), (4, 2), (4, 4)},
         2: {(1, 4), (2, 4)}, 3: {(1, 4), (2, 4)}, 4: {(1, 4), (2, 4)}}


@dataclass(frozen=True)
class NativeGemvConfig:
    """rows_per_warp rows of W per warp at once, loads_per_lane 16-byte loads of each in flight
    per lane (BUILT: the pairs compiled per M), at most blocks_per_sm blocks of 256 threads per SM
    (each stages x once), prefetch_steps batches asked into L2 ahead of their loads."""
    rows_per_warp: int = 2
    loads_per_lane: int = 4
    blocks_per_sm: int = 2
    prefetch_steps: int = 0
    mma: bool = False     # the tensor-core path (one row of x; rows_per_warp, loads_per_lane unused)


def mma_applies(k: int, group_size: int) -> bool:
    """Whether the tensor-core path takes K inputs in groups of group_size (>= K: one group)."""
    return k % 128 == 0 and (group_size >= k or group_size % 128 == 0)


@functools.cache
def default_config(n: int, k: int, m: int, sms: int, group_size: int = -1,
                   mma: bool = False) -> NativeGemvConfig:
    """From the H200 sweep (benchmarks/results/kernels_quant_gemv_native_h200_run*.json): one row
    of x takes 4 loads in flight per lane a batch: 2 rows per warp with 2 loads each, unless 1 row
    per warp (4 loads) splits the rows into tiles that fill the grid's last round better (each
    block handles whole tiles). In the decode graph (runs 70-71, ms a step): gate_up 1.780 with
    2x2 against 1.815 with 2x4, o_proj 1.749 against 1.780, qkv 1.736 with 1x4 against 1.794 with
    1x2 and 1.753 with 2x2. Long rows (K > 8192) also take 3 blocks per SM. Two rows of x take 1
    row per warp, more take 2. ``sms``: the
    device's multiprocessor count. ``mma``: one row of x takes the tensor-core path where it
    applies (groups of group_size inputs, -1: one group)."""
    if mma and m == 1 and mma_applies(k, k if group_size < 0 else group_size):
        return NativeGemvConfig(mma=True)
    if m >= 3:
        return NativeGemvConfig(2, 4, 2)
    if m == 2:
        return NativeGemvConfig(1, 4, 2)
    if k > 8192:
        return NativeGemvConfig(2, 2, 3)
    return min((NativeGemvConfig(2, 2, 2), NativeGemvConfig(1, 4, 2)),
               key=lambda c: _last_round_waste(n, c, sms))


def _last_round_waste(n: int, cfg: NativeGemvConfig, sms: int) -> float:
    """Idle share of the grid's block slots over the rounds of row tiles (8 warps a tile)."""
    tiles = -(-n // (8 * cfg.rows_per_warp))
    slots = sms * cfg.blocks_per_sm
    if tiles <= slots:
        return 0.0
    rounds = -(-tiles // slots)
    return 1 - tiles / (rounds * slots)


def check_operands(x, w_q, scales, zeros, perm, bias, group_size: int,
                   cfg: NativeGemvConfig, fused: FusedInput | None = None,
                   epilogue: str | None = None) -> None:
    """ValueError naming what the kernel cannot take (checked here, before the extension)."""
    m = x.shape[0]
    n, k = w_q.shape[0], w_q.shape[1] * 8
    if epilogue is not None and (epilogue not in EPILOGUES or n % 2
                                 or (cfg.rows_per_warp != 2 and not cfg.mma)):
        raise ValueError(f"int4_gemv: epilogue must be one of {sorted(EPILOGUES)}, with an even "
                         f"number of rows of W and rows_per_warp 2 (or mma); got {epilogue!r}, "
                         f"{n} rows, rows_per_warp {cfg.rows_per_warp}")
    if cfg.mma and (m != 1 or not mma_applies(k, group_size)):
        raise ValueError(f"int4_gemv: mma takes one row of x, K a multiple of 128 and groups of a "
                         f"multiple of 128 inputs (or one group); got {m} rows, K {k}, group size "
                         f"{group_size}")
    g = 1 if group_size >= k else k // group_size
    if n * (k // 32) >= 2**31:
        raise ValueError(f"int4_gemv: w_q {tuple(w_q.shape)} has 2^31 or more 16-byte chunks; "
                         f"the kernel addresses W with 32-bit offsets")
    if not cfg.mma and (cfg.rows_per_warp, cfg.loads_per_lane) not in BUILT.get(m, ()):
        raise ValueError(f"int4_gemv: no kernel built for rows_per_warp {cfg.rows_per_warp}, "
                         f"loads_per_lane {cfg.loads_per_lane} at {m} rows of x; built: "
                         f"{sorted(BUILT.get(m, ()))}")
    if cfg.blocks_per_sm < 1 or cfg.prefetch_steps < 0:
        raise ValueError(f"int4_gemv: blocks_per_sm must be >= 1 and prefetch_steps >= 0, got "
                         f"{cfg.blocks_per_sm}, {cfg.prefetch_steps}")
    columns = 2 * k if fused is not None and fused.op == "silu_and_mul" else k
    if x.shape[1] != columns:
        raise ValueError(f"int4_gemv: x must have {columns} columns for w_q {tuple(w_q.shape)}"
                         f"{' (silu_and_mul: gate|up)' if columns != k else ''}, got "
                         f"{x.shape[1]}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != x.dtype or tuple(t.shape) != (n, g) or not t.is_contiguous():
            raise ValueError(f"int4_gemv: {name} must be contiguous [{n}, {g}] in {x.dtype}, "
                             f"got {tuple(t.shape)} {t.dtype}")
    if perm is not None and (perm.dtype != torch.int32 or perm.numel() != k):
        raise ValueError(f"int4_gemv: perm must be int32 [{k}], got {tuple(perm.shape)} "
                         f"{perm.dtype}")
    if bias is not None and (bias.dtype != x.dtype or bias.numel() != n):
        raise ValueError(f"int4_gemv: bias must be [{n}] in {x.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    if fused is not None and fused.op == "rms_norm":
        _check_norm_operands(fused, x, m, k)


def _check_norm_operands(fused: FusedInput, x: torch.Tensor, m: int, k: int) -> None:
    w = fused.weight
    if w is None or w.dtype != x.dtype or w.numel() != k or not w.is_contiguous():
        raise ValueError(f"int4_gemv: the norm's weight must be contiguous [{k}] in {x.dtype}, "
                         f"got {None if w is None else (tuple(w.shape), w.dtype)}")
    for name in ("residual", "residual_out"):
        t = getattr(fused, name)
        if t is not None and (t.dtype != x.dtype or tuple(t.shape) != (m, k)
                              or not t.is_contiguous()):
            raise ValueError(f"int4_gemv: {name} must be contiguous [{m}, {k}] in {x.dtype}, "
                             f"got {tuple(t.shape)} {t.dtype}")
    out = fused.residual_out
    if out is not None and any(out.data_ptr() == t.data_ptr() for t in (x, fused.residual)):
        raise ValueError("int4_gemv: residual_out must be a buffer of its own (every block "
                         "reads x and residual while the sum is written)")


def shared_memory_bytes(m: int, k: int) -> int:
    """x staged per block: fp16 pairs and one float per 32 inputs, per row."""
    return m * (k // CHUNK) * (4 * 16 + 4)


@functools.cache
def _shared_memory_limit(device: int) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _flag(name: str) -> bool:
    return os.environ.get(name, "1") != "0"


def enabled() -> bool:
    return _flag("LOOM_NATIVE_KERNELS")


@functools.cache
def _module():
    """The built extension (the tracing build with LOOM_NATIVE_TRACE=1), or None (warned once)
    where it cannot be built."""
    from loom.csrc import BuildError, load
    defines = ("LOOM_GEMV_TRACE",) if os.environ.get("LOOM_NATIVE_TRACE") == "1" else ()
    try:
        return load("wna16_gemv", defines)
    except BuildError as e:
        logger.warning("the native int4 GEMV is not available, the Triton GEMV runs instead: %s",
                       e)
        return None


def warm_up() -> None:
    """Build (or load) the kernel now, at model load, rather than in the first step."""
    if enabled() and torch.cuda.is_available() and torch.version.hip is None:
        _module()


@functools.cache
def _pdl_supported(device: int) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def pdl(device: torch.device) -> bool:
    """Whether to launch as a programmatic dependent: sm_90+ unless LOOM_NATIVE_PDL=0."""
    return _flag("LOOM_NATIVE_PDL") and _pdl_supported(device.index or 0)


def applies(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, bits: int,
            group_size: int, g_idx: torch.Tensor | None, op: str | None = None,
            epilogue: str | None = None) -> bool:
    """Whether the native GEMV takes x @ W^T, with ``op`` (FusedInput.op) applied to x first and
    ``epilogue`` to the result: int4, 1-4 rows of bf16/fp16 CUDA x with scales in its dtype, K a
    multiple of 32 (x [M, K]; [M, 2K] for silu_and_mul), groups of whole 32-input chunks (or one
    per row), no g_idx (a perm is fine), an even N for the epilogue; and it built."""
    k = w_q.shape[1] * 8
    columns = 2 * k if op == "silu_and_mul" else k
    if epilogue is not None and (epilogue not in EPILOGUES or w_q.shape[0] % 2
                                 or not _flag("LOOM_NATIVE_FUSED_OUTPUT")):
        return False
    return (bits == 4 and x.is_cuda and torch.version.hip is None and x.dim() == 2
            and 1 <= x.shape[0] <= MAX_M and x.dtype in DTYPES and x.stride(1) == 1
            and scales.dtype == x.dtype
            and (op is None or (op in PROLOGUES and _flag("LOOM_NATIVE_FUSED_INPUT")))
            and k % CHUNK == 0 and x.shape[1] == columns and g_idx is None
            and (group_size >= k or group_size % CHUNK == 0) and enabled()
            and _module() is not None
            and shared_memory_bytes(x.shape[0], k) <= _shared_memory_limit(x.device.index or 0))


@functools.cache
def parse_flags(value: str) -> int:
    """LOOM_NATIVE_GEMV_FLAGS ("name,name") as the kernel's bit mask."""
    bits = 0
    for name in filter(None, (v.strip() for v in value.split(","))):
        if name not in FLAGS:
            raise ValueError(f"LOOM_NATIVE_GEMV_FLAGS: unknown flag {name!r}; known: "
                             f"{sorted(FLAGS)}")
        bits |= FLAGS[name]
    return bits


@functools.cache
def parse_configs(value: str) -> dict[tuple[int, int], NativeGemvConfig]:
    """LOOM_NATIVE_GEMV_CONFIG ("NxK=R/U/B;...") as {(N, K): config}."""
    configs = {}
    for item in filter(None, (v.strip() for v in value.split(";"))):
        try:
            shape, _, fields = item.partition("=")
            n, k = (int(v) for v in shape.split("x"))
            r, u, b = (int(v) for v in fields.split("/"))
        except ValueError:
            raise ValueError(f"LOOM_NATIVE_GEMV_CONFIG: {item!r} is not NxK=R/U/B (e.g. "
                             f"6144x4096=2/4/2)") from None
        configs[(n, k)] = NativeGemvConfig(r, u, b)
    return configs


def _configured(n: int, k: int, m: int, device: torch.device, group_size: int) -> NativeGemvConfig:
    override = parse_configs(os.environ.get("LOOM_NATIVE_GEMV_CONFIG", "")).get((n, k))
    if override is not None and m == 1:
        return override
    return default_config(n, k, m, num_sms(device), group_size,
                          os.environ.get("LOOM_NATIVE_MMA") == "1")


def trace_start(capacity: int, device: torch.device) -> torch.Tensor:
    """Start recording (the tracing build, LOOM_NATIVE_TRACE=1): every block of the lanes' path
    writes one row of the returned int64 [capacity, 8] buffer: the ns at its start, after the wait,
    after staging, after its tiles and at its end; then (n, k) and (block, sm), int32 pairs."""
    module = _module()
    if module is None or not hasattr(module, "trace_start"):
        raise RuntimeError("int4_gemv tracing needs LOOM_NATIVE_TRACE=1 set before the first "
                           "call (the tracing build) and a GPU where the kernel builds")
    buffer = torch.zeros(capacity, 8, dtype=torch.int64, device=device)
    module.trace_start(buffer)
    return buffer


def trace_stop(buffer: torch.Tensor) -> torch.Tensor:
    """Stop recording; the records written into ``buffer`` (on the CPU). Raises if some were
    dropped for want of room."""
    count = _module().trace_stop()
    if count > buffer.shape[0]:
        raise RuntimeError(f"int4_gemv trace: {count} blocks recorded, room for {buffer.shape[0]}")
    return buffer[:count].cpu()


def int4_gemv(x: torch.Tensor | FusedInput, w_q: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor, perm: torch.Tensor | None, group_size: int,
              bias: torch.Tensor | None = None, config: NativeGemvConfig | None = None,
              epilogue: str | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N] in x's dtype (``applies`` must hold); x may be a
    FusedInput, whose op the kernel applies first (filling its residual_out). With
    ``epilogue="silu_and_mul"``: silu(y[:, :N/2]) * y[:, N/2:], [M, N/2]."""
    fused = x if isinstance(x, FusedInput) else None
    if fused is not None:
        x = fused.x
    cfg = config or _configured(w_q.shape[0], w_q.shape[1] * 8, x.shape[0], x.device, group_size)
    if epilogue is not None and config is None and not cfg.mma:   # a warp: a gate row, its up row
        cfg = dataclasses.replace(cfg, rows_per_warp=2)
    if not 1 <= x.shape[0] <= MAX_M:
        raise ValueError(f"int4_gemv takes 1 to {MAX_M} rows of x, got {x.shape[0]}")
    check_operands(x, w_q, scales, zeros, perm, bias, group_size, cfg, fused, epilogue)
    norm = fused is not None and fused.op == "rms_norm"
    return _module().wna16_int4_gemv(
        x, w_q, scales, zeros, perm, bias, group_size, cfg.rows_per_warp, cfg.loads_per_lane,
        cfg.blocks_per_sm, cfg.prefetch_steps, PROLOGUES[fused.op] if fused else 0,
        fused.residual if norm else None, fused.residual_out if norm else None,
        fused.weight if norm else None, float(fused.eps) if norm else 0.0, pdl(x.device),
        EPILOGUES[epilogue] if epilogue else 0, cfg.mma,
        parse_flags(os.environ.get("LOOM_NATIVE_GEMV_FLAGS", "")))
