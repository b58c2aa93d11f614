"""INT8 W8A8: int8 weights with per-channel (or per-tensor) scales, or float weights quantized
per channel while loading (``online``); int8 activations quantized statically (one scale, and a
zero point when asymmetric, per tensor) or dynamically per token.

After loading: ``w_int8`` [N, K], ``w_scale`` [N] (per-tensor scales of fused shards become
per-channel ones), static ``a_scale``/``a_zero`` (the shards' input ranges merged into one that
covers them all), and ``w_sum`` [N] for the zero-point correction. On CUDA: torch._int_mm then
scaling, y = s_x * s_w * (x_q @ w_q^T - z_x * sum_k w_q); elsewhere the reference twin dequantizes
both operands (activations quantized exactly as on the GPU) and multiplies in the activation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.plugins.quant.schemes.base import Scheme

QMIN, QMAX = -128, 127
INT_MM_MIN_M = 17   # torch._int_mm needs more than 16 rows


def quantize_act(x: torch.Tensor, scale, zero) -> torch.Tensor:
    """round(clamp(x / scale + zero)), as compressed-tensors quantizes."""
    q = x.float() / scale
    return torch.round((q if zero is None else q + zero).clamp(QMIN, QMAX)).to(torch.int8)


def quantize_weight(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weight [N, K] and its fp32 scale max|w| / 127 ([N, 1] per channel, or 0-d)."""
    w = w.float()
    scale = w.abs().amax(1, keepdim=True) if per_channel else w.abs().amax()
    scale = scale.clamp(min=1e-12) / QMAX
    return torch.round(w / scale).clamp(QMIN, QMAX).to(torch.int8), scale


def dynamic_params(x: torch.Tensor, symmetric: bool):
    """Per-token (scale [M, 1], zero [M, 1] or None) covering each row's range."""
    x = x.float()
    if symmetric:
        return x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / QMAX, None
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (QMAX - QMIN)).clamp(min=1e-12)
    return scale, torch.round(QMIN - lo / scale)


def merge_ranges(scales: torch.Tensor, zeros: torch.Tensor | None):
    """One static (scale, zero) for the shards of a fused layer: theirs when they agree, else
    one whose range covers all of theirs."""
    if zeros is None:
        return scales.max(), None
    if bool((scales == scales[0]).all() and (zeros == zeros[0]).all()):
        return scales[0], zeros[0].float()
    lo = (scales * (QMIN - zeros)).min()
    hi = (scales * (QMAX - zeros)).max()
    scale = (hi - lo) / (QMAX - QMIN)
    return scale, torch.round(QMIN - lo / scale)


class Int8W8A8(Scheme):
    """``weight``: channel | tensor | online (float weights quantized per channel after loading);
    ``static``: a checkpoint input scale (else per token); ``symmetric``: activations without a
    zero point."""

    name = "int8"

    def __init__(self, weight: str, static: bool, symmetric: bool):
        if weight not in ("channel", "tensor", "online"):
            raise ValueError(f"int8 W8A8: unsupported weight scales {weight!r}")
        if weight == "online" and static:
            raise ValueError("int8 W8A8: weights quantized while loading go with dynamic "
                             "activations")
        self.weight, self.static, self.symmetric = weight, static, symmetric

    def create_weights(self, layer, input_size, output_sizes, bias, params_dtype):
        n = sum(output_sizes)
        self.add_bias(layer, bias, params_dtype)
        if self.weight == "online":
            self.new_param(layer, "weight", (n, input_size), params_dtype, output_dim=0,
                           input_dim=1)
            return
        self.new_param(layer, "weight", (n, input_size), torch.int8, output_dim=0, input_dim=1)
        if self.weight == "channel":
            self.new_param(layer, "weight_scale", (n, 1), torch.float32, output_dim=0)
        else:
            self.per_shard_param(layer, "weight_scale", (), torch.float32)
        if self.static:
            self.per_shard_param(layer, "input_scale", (), torch.float32)
            if not self.symmetric:
                self.per_shard_param(layer, "input_zero_point", (), torch.int32)

    def checkpoint_names(self):
        return ("weight", "weight_scale", "input_scale", "input_zero_point", "bias")

    def quantize(self, weight):
        """What an offline quantizer writes for the conformance kit; a static input range
        covers inputs in [-16, 16]."""
        if self.weight == "online":
            return {"weight": weight}
        w_int8, scale = quantize_weight(weight, self.weight == "channel")
        tensors = {"weight": w_int8, "weight_scale": scale}
        if self.static:
            tensors["input_scale"] = torch.tensor(16 / QMAX, device=weight.device)
            if not self.symmetric:
                tensors["input_zero_point"] = torch.tensor(0, device=weight.device)
        return tensors

    def process_after_loading(self, layer):
        weight, scale = self.weight_and_scale(layer)
        a_scale = a_zero = None
        if self.static:
            zeros = None if self.symmetric else layer.input_zero_point.data.float()
            a_scale, a_zero = merge_ranges(layer.input_scale.data.float(), zeros)
        w_sum = None if self.symmetric else weight.sum(1, dtype=torch.int32).float()
        self.replace(layer, w_int8=weight, w_scale=scale.view(-1).contiguous(), a_scale=a_scale,
                     a_zero=a_zero, w_sum=w_sum)

    def weight_and_scale(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 weight [N, K] and its fp32 scale, one per output row."""
        if self.weight == "online":
            return quantize_weight(layer.weight.data, per_channel=True)
        scale = layer.weight_scale.data.float()
        if self.weight == "tensor":
            scale = scale.repeat_interleave(torch.tensor(layer.output_sizes, device=scale.device))
        return layer.weight.data, scale

    def act_params(self, layer, x: torch.Tensor):
        if self.static:
            return layer.a_scale, layer.a_zero
        return dynamic_params(x, self.symmetric)

    def apply(self, layer, x, bias):
        x2 = x.reshape(-1, x.shape[-1])
        scale, zero = self.act_params(layer, x2)
        xq = quantize_act(x2, scale, zero)
        if x.is_cuda:
            y = self.int_mm(layer, xq, scale, zero, x.dtype)
            y = y if bias is None else y + bias
        else:
            xd = ((xq.float() - (0 if zero is None else zero)) * scale).to(x.dtype)
            wd = (layer.w_int8.float() * layer.w_scale[:, None]).to(x.dtype)
            y = F.linear(xd, wd, bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def int_mm(self, layer, xq: torch.Tensor, scale, zero, dtype: torch.dtype) -> torch.Tensor:
        m = xq.shape[0]
        padded = F.pad(xq, (0, 0, 0, max(0, INT_MM_MIN_M - m)))
        acc = torch._int_mm(padded, layer.w_int8.t())[:m].float()
        if zero is not None:
            acc = acc - zero * layer.w_sum[None, :]
        return (acc * scale * layer.w_scale[None, :]).to(dtype)
