"""A toy int8 weight-only method: per-output-channel symmetric int8, dequantized on each call.

Its checkpoint layout, per linear: ``weight`` int8 [out, in], ``weight_scale`` float32 [out]
and, when the model has one, ``bias``; config.json says ``"quantization_config":
{"quant_method": "example-int8"}``. ``python -m loom_example_plugin.quant SRC DST`` writes
such a checkpoint from a float one. Selected by name on a float checkpoint, it quantizes the
weights as they load instead. (A real method would run an int8 kernel; this one shows the
contract: create_weights, load, process_after_loading, apply, quantize, dequantize.)
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loom.quant import QuantMethod

QUANT_METHOD = "example-int8"
LINEAR_SUFFIXES = ("_proj.weight",)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], float32 scale [out]) with weight ~= q * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


class ExampleInt8(QuantMethod):
    name = QUANT_METHOD

    def __init__(self, prequantized: bool = True):
        self.prequantized = prequantized

    @classmethod
    def matches(cls, quantization_config):
        return bool(quantization_config) and quantization_config.get("quant_method") == QUANT_METHOD

    @classmethod
    def from_config(cls, quantization_config):
        if quantization_config and not cls.matches(quantization_config):
            raise ValueError(f"{QUANT_METHOD} cannot load a checkpoint quantized with "
                             f"{quantization_config.get('quant_method')!r}")
        return cls(prequantized=bool(quantization_config))

    def checkpoint_names(self):
        return ("weight", "weight_scale", "bias") if self.prequantized else ("weight", "bias")

    def create_weights(self, layer, input_size, output_sizes, bias, params_dtype):
        out = sum(output_sizes)
        weight_dtype = torch.int8 if self.prequantized else params_dtype
        _register(layer, "weight", torch.empty(out, input_size, dtype=weight_dtype))
        if self.prequantized:
            _register(layer, "weight_scale", torch.empty(out, dtype=torch.float32))
        if bias:
            _register(layer, "bias", torch.zeros(out, dtype=params_dtype))
        else:
            layer.register_parameter("bias", None)

    def process_after_loading(self, layer):
        if self.prequantized:
            return
        q, scale = quantize_weight(layer.weight.data)
        _register(layer, "weight", q)
        _register(layer, "weight_scale", scale)

    def apply(self, layer, x, bias):
        weight = dequantize_weight(layer.weight, layer.weight_scale).to(x.dtype)
        return F.linear(x, weight, bias)

    def quantize(self, weight):
        if not self.prequantized:
            return {"weight": weight}
        q, scale = quantize_weight(weight)
        return {"weight": q, "weight_scale": scale}

    def dequantize(self, layer):
        return dequantize_weight(layer.weight, layer.weight_scale)


def _register(layer: nn.Module, name: str, data: torch.Tensor) -> None:
    param = nn.Parameter(data, requires_grad=False)
    param.output_dim = 0                 # fused shards (q|k|v, gate|up) stack along dim 0
    if name in layer._parameters:
        del layer._parameters[name]
    layer.register_parameter(name, param)


def quantize_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write DST: the float Hugging Face model directory SRC with its linear weights in
    example-int8's layout (one safetensors file) and the quantization_config that says so."""
    from safetensors.torch import save_file

    from loom.loader import iterate_weights

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in iterate_weights(src):
        if name.endswith(LINEAR_SUFFIXES) and tensor.dim() == 2:
            q, scale = quantize_weight(tensor)
            tensors[name] = q
            tensors[name.removesuffix("weight") + "weight_scale"] = scale
        else:
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(dst / "model.safetensors"))
    for file in src.iterdir():
        if file.is_file() and not file.name.startswith("model") and file.suffix != ".safetensors":
            shutil.copy2(file, dst / file.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": 8}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m loom_example_plugin.quant SRC_MODEL_DIR DST_MODEL_DIR")
    print(quantize_checkpoint(sys.argv[1], sys.argv[2]))
