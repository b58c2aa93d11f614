"""The ``triton`` fused ops plugin: one Triton kernel per op (kernels in kernels.py).

``rotary`` rotates q and k in place (views of the qkv output are fine) and returns them;
``rotary_write_kv`` rotates q in place and stores the rotated k (k itself is left) and v in the
cache, one kernel; the norms and ``silu_and_mul`` write new tensors and leave their inputs as the
torch twin does.
"""
from __future__ import annotations


from loom.hookspecs import hookimpl
from loom.ops import FusedOps


class TritonFusedOps(FusedOps):
    name = "triton"
    graph_safe_write_kv = True

    @classmethod
    def is_supported(cls, platform) -> bool:
        return platform.supports_triton()

    def __init__(self):
        # Imported here, not at module level: triton.jit picks compiled or interpreted
        # (TRITON_INTERPRET) when the kernels are defined.
        from loom.plugins.ops.triton import kernels
        self.kernels = kernels

    def rms_norm(self, x, weight, eps):
        return self.kernels.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self.kernels.add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, x):
        return self.kernels.silu_and_mul(x)

    def rms_norm_quant(self, x, weight, eps, fp8_dtype):
        return self.kernels.rms_norm_quant(x, weight, eps, fp8_dtype)

    def add_rms_norm_quant(self, x, residual, weight, eps, fp8_dtype):
        return self.kernels.add_rms_norm_quant(x, residual, weight, eps, fp8_dtype)

    def silu_and_mul_quant(self, x, fp8_dtype):
        return self.kernels.silu_and_mul_quant(x, fp8_dtype)

    def rotary(self, positions, q, k, cos_sin_cache):
        return self.kernels.rotary(positions, q, k, cos_sin_cache)

    def write_kv(self, kv_cache, k, v, slot_mapping, k_scale=1.0, v_scale=1.0):
        self.kernels.write_kv(kv_cache, k, v, slot_mapping, k_scale, v_scale)

    def rotary_write_kv(self, positions, q, k, v, cos_sin_cache, kv_cache, slot_mapping,
                        k_scale=1.0, v_scale=1.0):
        return self.kernels.rotary_write_kv(positions, q, k, v, cos_sin_cache, kv_cache,
                                            slot_mapping, k_scale, v_scale)


@hookimpl
def loom_fused_ops():
    return [TritonFusedOps]
