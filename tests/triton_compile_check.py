"""Compile Triton kernels (attention, per-token FP8 quantization, the fused rotary and cache write) for sm90 (an H200) on a machine without a GPU: the
interpreter the CPU tests use accepts code that the compiler rejects (e.g. returns of different
dtypes from one function). Run by tests/test_triton_compile.py without TRITON_INTERPRET."""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import loom  # noqa: F401  (package first: its modules import each other)
from loom.plugins.attention.triton import kernels
from loom.plugins.ops.triton import kernels as ops_kernels
from loom.plugins.quant.triton import per_token_quant

TARGET = GPUTarget("cuda", 90, 32)
STRIDES = ("c_stride_kv", "c_stride_block", "c_stride_off", "c_stride_h")


def compile_kernel(fn, args: dict, constexprs: dict) -> None:
    signature = {**args, **{name: "constexpr" for name in constexprs}}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET)


def cache_type(cache: str) -> str:
    return {"bf16": "*bf16", "fp8": "*fp8e4nv"}[cache]


def decode(cache: str, fp16: bool, splits: int, gdc: bool = False) -> None:
    args = {"out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
            "q_ptr": "*bf16", "cache_ptr": cache_type(cache), "block_tables_ptr": "*i32",
            "seq_lens_ptr": "*i32", "scale_log2": "fp32", "v_scale": "fp32",
            **dict.fromkeys(("q_stride_t", "q_stride_h", "o_stride_t", "o_stride_h",
                             "bt_stride"), "i32"), **dict.fromkeys(STRIDES, "i64")}
    compile_kernel(kernels._decode_attention, args, dict(
        NUM_HEADS=32, GROUP=4, HEAD_SIZE=128, HEAD_PAD=128, BLOCK_SIZE=16, BLOCK_H=16, TILE=128,
        NUM_SPLITS=splits, FP16=fp16, USE_GDC=gdc))


def reduce_splits(gdc: bool) -> None:
    args = {"out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
            "o_stride_t": "i32", "o_stride_h": "i32"}
    compile_kernel(kernels._reduce_splits, args, dict(NUM_HEADS=32, HEAD_SIZE=128, HEAD_PAD=128,
                                                      NUM_SPLITS=16, USE_GDC=gdc))


def rotary_write_kv(cache: str, gdc: bool) -> None:
    args = {"pos_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16",
            "rope_ptr": "*fp32", "rope_stride": "i32", "cache_ptr": cache_type(cache),
            "slot_ptr": "*i64", "k_scale": "fp32", "v_scale": "fp32", "fp8_max": "fp32",
            "q_heads": "i32", **dict.fromkeys(("q_st", "q_sh", "k_st", "k_sh", "v_st", "v_sh"),
                                              "i32"), **dict.fromkeys(STRIDES, "i64")}
    compile_kernel(ops_kernels._rotary_write_kv_kernel, args, dict(
        NUM_KV_HEADS=8, HALF=64, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_D=64, BLOCK_SIZE=16,
        FP8=cache == "fp8", USE_GDC=gdc))


def prefill(cache: str, fp16: bool) -> None:
    args = {"out_ptr": "*bf16", "q_ptr": "*bf16", "cache_ptr": cache_type(cache),
            "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_ptr": "*i32",
            "first_seq": "i32", "num_seqs": "i32", "scale_log2": "fp32", "v_scale": "fp32",
            **dict.fromkeys(("q_stride_t", "q_stride_h", "o_stride_t", "o_stride_h",
                             "bt_stride"), "i32"), **dict.fromkeys(STRIDES, "i64")}
    compile_kernel(kernels._prefill_attention, args, dict(
        GROUP=4, HEAD_SIZE=128, HEAD_PAD=128, BLOCK_SIZE=16, BLOCK_M=128, BLOCK_Q=32, TILE=64,
        FP16=fp16))


def per_token_fp8(x_type: str) -> None:
    args = {"x_ptr": x_type, "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "K": "i32",
            "stride_x": "i32", "stride_q": "i32"}
    compile_kernel(per_token_quant._per_token_fp8_kernel, args,
                   dict(FP8_MAX=448.0, BLOCK=per_token_quant.BLOCK))


def main() -> int:
    cases = [(decode, ("bf16", False, 1)), (decode, ("bf16", False, 8)),
             (decode, ("fp8", True, 1)), (decode, ("fp8", False, 4)), (decode, ("fp8", True, 2)),
             (prefill, ("bf16", False)), (prefill, ("fp8", True)), (prefill, ("fp8", False)),
             (per_token_fp8, ("*bf16",)), (per_token_fp8, ("*fp16",)),
             (decode, ("bf16", False, 16, True)), (reduce_splits, (True,)),
             (rotary_write_kv, ("bf16", True)), (rotary_write_kv, ("fp8", False))]
    failed = 0
    for fn, case in cases:
        try:
            fn(*case)
        except Exception as e:                       # report every failing case, then fail
            failed += 1
            cause = e.__cause__ or e.__context__ or e
            print(f"FAILED {fn.__name__}{case}: {type(e).__name__}: {cause!r}"[:2000])
    print(f"compiled {len(cases) - failed} of {len(cases)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
