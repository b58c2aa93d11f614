"""Layers of the Llama family, numerically identical to Hugging Face transformers.

``Linear`` holds its weights through a QuantMethod. Tensor parallelism will add column and row
variants that override ``load`` (take this rank's slice of a checkpoint tensor) and ``forward``
(gather or all-reduce the output); the model code stays the same.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loom import ops
from loom.quant import QuantMethod


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with ``residual``: (norm(x + residual), x + residual)."""
        if residual is None:
            return ops.active().rms_norm(x, self.weight, self.eps)
        return ops.active().add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotate-half (neox) rope over a float32 cos/sin cache of every position."""

    def __init__(self, head_dim: int, max_position: int, base: float,
                 rope_scaling: dict | None = None):
        super().__init__()
        inv_freq = _inv_freq(head_dim, base, rope_scaling)
        freqs = torch.arange(max_position, dtype=torch.float32, device="cpu")[:, None] * inv_freq
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, H, D] and k [T, KVH, D] rotated by their token's position."""
        return ops.active().rotary(positions, q, k, self.cos_sin_cache)


def _inv_freq(head_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base ** exponents)
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, medium ones interpolated."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class SiluAndMul(nn.Module):
    """silu(x[..., :n]) * x[..., n:] for x [..., 2n] (the fused gate|up output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.active().silu_and_mul(x)


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(VocabEmbedding):
    """The output projection hidden -> vocab logits."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


class Linear(nn.Module):
    """y = x W^T + b, with W the concatenation of ``output_sizes`` shards (q|k|v, gate|up).

    The QuantMethod creates the parameters (``bias`` among them, or None) and does the matmul.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool,
                 quant_method: QuantMethod, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.quant_method = quant_method
        self.register_parameter("bias", None)
        quant_method.create_weights(self, input_size, self.output_sizes, bias,
                                    params_dtype or torch.get_default_dtype())

    def load(self, param_name: str, loaded: torch.Tensor, shard_id: int | None) -> None:
        """Copy a checkpoint tensor into ``param_name`` (shard ``shard_id`` when fused)."""
        self.quant_method.load(self, param_name, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)
