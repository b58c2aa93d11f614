"""Quant-method test cases: a method on its own checkpoint layout against dequantize-then-matmul.

The kit takes the method for a layer as the model does (``check_platform``, then
``for_layer(prefix)``), quantizes random float weights with its ``quantize`` (its checkpoint
layout), loads the tensors into a real ``Linear`` through ``load``, shard by shard as the model
loader does, and runs ``process_after_loading``. ``apply`` must then equal x @ W^T + b for W the
method's ``dequantize(layer)``, which must itself be close to the float weights; a method
without ``dequantize`` is compared with the float weights, at quantization-error tolerance.
"""
from __future__ import annotations

import pytest
import torch

from loom.models.layers import Linear

INPUT_SIZE = 256
# one plain linear; one fused like q|k|v
OUTPUT_SIZES = {"single": [256], "fused": [256, 128, 128]}
# where such layers sit in a Llama (for_layer may pick a per-layer method by prefix)
PREFIXES = {"single": "model.layers.0.mlp.down_proj",
            "fused": "model.layers.0.self_attn.qkv_proj"}
ROWS = {"decode": 1, "few": 5, "prefill": 64}
# apply against the dequantized weight's matmul (float32), relative error
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# the dequantized (or applied) weight against the float weight it came from: room for 3-bit
WEIGHT_TOLERANCE = 0.25


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def build_linear(method, output_sizes, bias: bool, dtype, device,
                 input_size: int = INPUT_SIZE) -> Linear:
    with torch.device(device):
        return Linear(input_size, list(output_sizes), bias, method, params_dtype=dtype)


def random_shards(output_sizes, bias: bool, device, input_size: int = INPUT_SIZE, seed: int = 0):
    """Float32 weights [out_i, in] (scaled as a trained layer's) and biases, one per shard."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = [torch.randn(n, input_size, generator=gen, device=device) / input_size ** 0.5
               for n in output_sizes]
    biases = [torch.randn(n, generator=gen, device=device) for n in output_sizes] if bias else None
    return weights, biases


def quantize(method, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``method.quantize(weight)``; a method without it fails the check, saying why."""
    try:
        return method.quantize(weight)
    except NotImplementedError:
        pytest.fail(f"quant method {method.name!r} has no quantize(): the kit needs it (plugin "
                    f"API 1.1) to write test weights in the method's checkpoint layout",
                    pytrace=False)


def load_quantized(layer: Linear, method, weights, biases, dtype) -> None:
    """Quantize each shard with ``method.quantize`` and load it as the model loader does."""
    fused = len(weights) > 1
    names = method.checkpoint_names()
    for shard, weight in enumerate(weights):
        tensors = quantize(method, weight)
        assert tensors, f"quant method {method.name!r}: quantize() returned no tensors"
        unknown = set(tensors) - set(names)
        assert not unknown, (f"quant method {method.name!r}: quantize() returned {sorted(unknown)}"
                             f", which checkpoint_names() {names} does not list")
        for name, tensor in tensors.items():
            layer.load(name, tensor, shard if fused else None)
        if biases is not None:
            layer.load("bias", biases[shard].to(dtype), shard if fused else None)
    method.process_after_loading(layer)


def reference_weight(method, layer: Linear):
    """``method.dequantize(layer)`` as float32, or None when the method does not provide it."""
    try:
        weight = method.dequantize(layer)
    except NotImplementedError:
        return None
    return weight.float()


def random_input(rows: int, dtype, device, input_size: int = INPUT_SIZE, seed: int = 1):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(rows, input_size, generator=gen, device=device).to(dtype)
