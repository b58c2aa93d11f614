"""FP8 checkpoints (``quant_method: fp8``): per-tensor ``weight_scale`` with a static
``input_scale`` or dynamic per-token activations (``activation_scheme``), or 128x128 blocks
(``weight_block_size``, ``weight_scale_inv``, dynamic per-token-group activations), as DeepSeek,
Qwen, transformers and auto-round's fp8 export write them; ``ignored_layers`` or
``modules_to_not_convert`` stay unquantized. ``quantization: fp8`` on an unquantized checkpoint
quantizes the weights while loading (per channel) with dynamic per-token activations."""
from __future__ import annotations

import torch

from loom.hookspecs import hookimpl
from loom.plugins.quant.schemes.base import (Dense, check_kernels, checkpoint_config,
                                             same_for_all_parts)
from loom.plugins.quant.schemes.fp8 import Fp8Scheme
from loom.quant import QuantMethod


def skipped(name: str, modules: list[str]) -> bool:
    return any(name == m or name.endswith(f".{m}") or name.startswith(f"{m}.") for m in modules)


class Fp8(QuantMethod):
    name = "fp8"

    def __init__(self, config: dict | None):
        config = config or {}
        self.online = not config
        self.static = config.get("activation_scheme", "dynamic") == "static"
        self.block = tuple(config["weight_block_size"]) if config.get("weight_block_size") else None
        self.skip = list(config.get("ignored_layers") or config.get("modules_to_not_convert") or [])
        self.fp8_dtype = torch.float8_e4m3fn
        if config.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"fp8: format {config['fmt']!r} is not supported (e4m3)")
        if self.block and self.static:
            raise ValueError("fp8: block-wise weights with static activation scales are not "
                             "supported (dynamic)")

    @classmethod
    def matches(cls, quantization_config):
        return bool(quantization_config) and quantization_config.get("quant_method") == "fp8"

    @classmethod
    def from_config(cls, quantization_config):
        return cls(checkpoint_config(cls, quantization_config, optional=True))

    def check_platform(self, platform, dtype):
        check_kernels(self.name, platform, "fp8 block" if self.block else "fp8")
        self.fp8_dtype = platform.fp8_dtype or self.fp8_dtype

    def for_layer(self, prefix):
        if same_for_all_parts(prefix, lambda name: skipped(name, self.skip)):
            return Dense()
        if self.online:
            return Fp8Scheme("online", "token", fp8_dtype=self.fp8_dtype)
        if self.block:
            return Fp8Scheme("block", "group", self.block, "weight_scale_inv", self.fp8_dtype)
        return Fp8Scheme("tensor", "static" if self.static else "token", fp8_dtype=self.fp8_dtype)


@hookimpl
def loom_quant_methods():
    return [Fp8]
