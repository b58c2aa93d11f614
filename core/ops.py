"""Fused hot ops of the model: RMSNorm (with the residual add), SiLU-and-mul, rotary embedding,
and the paged KV-cache write that attention backends without their own may call (alone, or with
the rotary before it).

``FusedOps`` is both the interface and its torch reference twin, numerically what Hugging Face
transformers computes. Plugins register faster subclasses through ``loom_fused_ops``; the
engine picks one (``fused-ops`` in the config) and makes it active before building the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loom import attention  # a module: attention imports ops too
from loom.hookspecs import hookimpl
from loom.quant import QuantizedInput


class FusedOps:
    name = "torch"
    graph_safe_write_kv = False      # write_kv reads a device value on the host (slots -1)

    @classmethod
    def is_supported(cls, platform) -> bool:
        return True

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual); the add in the model dtype."""
        x = x + residual
        return self.rms_norm(x, weight, eps), x

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x[..., :n]) * x[..., n:] for x [..., 2n]."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    # The same ops with their output quantized per token to fp8 (for a layer whose QuantMethod's
    # input_quant asks for it): exactly the unfused op, then quantize_per_token.
    def rms_norm_quant(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                       fp8_dtype: torch.dtype) -> QuantizedInput:
        return quantize_per_token(self.rms_norm(x, weight, eps), fp8_dtype)

    def add_rms_norm_quant(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float, fp8_dtype: torch.dtype
                           ) -> tuple[QuantizedInput, torch.Tensor]:
        out, residual = self.add_rms_norm(x, residual, weight, eps)
        return quantize_per_token(out, fp8_dtype), residual

    def silu_and_mul_quant(self, x: torch.Tensor, fp8_dtype: torch.dtype) -> QuantizedInput:
        return quantize_per_token(self.silu_and_mul(x), fp8_dtype)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate-half (neox) rope: q [T, H, D], k [T, KVH, D]; cache [max_pos, D] = cos|sin."""
        cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        write_kv(kv_cache, k, v, slot_mapping, k_scale, v_scale)

    def rotary_write_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, k_scale: float = 1.0,
                        v_scale: float = 1.0) -> torch.Tensor:
        """rotary, then write_kv of the rotated k and v; returns the rotated q (k may be left
        unrotated: only the cache keeps it)."""
        q, k = self.rotary(positions, q, k, cos_sin_cache)
        self.write_kv(kv_cache, k, v, slot_mapping, k_scale, v_scale)
        return q


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store k/v [T, KVH, D] into kv_cache [2, num_blocks, block_size, KVH, D] at flat slots
    (block * block_size + offset); slot -1 (padding) is skipped. An fp8 cache gets
    quantize_fp8(k, k_scale) and quantize_fp8(v, v_scale)."""
    slots = slot_mapping[:k.shape[0]]
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    if attention.is_fp8(kv_cache):
        k, v = quantize_fp8(k, k_scale, kv_cache.dtype), quantize_fp8(v, v_scale, kv_cache.dtype)
        kv_cache, k, v = kv_cache.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    key_cache = kv_cache[0].view(-1, *kv_cache.shape[-2:])
    value_cache = kv_cache[1].view(-1, *kv_cache.shape[-2:])
    key_cache.index_copy_(0, slots, k.to(key_cache.dtype))
    value_cache.index_copy_(0, slots, v.to(value_cache.dtype))


def quantize_fp8(x: torch.Tensor, scale: float, fp8_dtype: torch.dtype) -> torch.Tensor:
    """x / scale in fp32, clamped to the range of ``fp8_dtype``, rounded to it."""
    limit = torch.finfo(fp8_dtype).max
    return (x.float() / scale).clamp(-limit, limit).to(fp8_dtype)


def quantize_per_token(x: torch.Tensor, fp8_dtype: torch.dtype) -> QuantizedInput:
    """Rows of x [..., K] to fp8 with scale max(|row|) / fp8_max (at least 1e-12 / fp8_max),
    as an FP8 method quantizes its input per token (x / scale in fp32, clamped, rounded)."""
    x2 = x.reshape(-1, x.shape[-1])
    limit = torch.finfo(fp8_dtype).max
    scale = x2.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / limit
    return QuantizedInput((x2.float() / scale).clamp(-limit, limit).to(fp8_dtype), scale, x.dtype)


def dequantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """fp8 values back to fp32: x * scale."""
    return x.float() * scale


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


_active: FusedOps = FusedOps()


def active() -> FusedOps:
    """The fused ops the model layers call."""
    return _active


def use(ops: FusedOps) -> None:
    global _active
    _active = ops


@hookimpl
def loom_fused_ops():
    return [FusedOps]
