"""``quantization: int8`` on an unquantized checkpoint: each linear's weight quantized to int8 per
output channel while loading (symmetric, scale max|w| / 127), activations quantized to int8 per
token as they arrive (symmetric), the product through the W8A8 int8 scheme (torch._int_mm on
CUDA, dequantize-then-matmul on the CPU). Never chosen by ``auto``: it is asked for by name."""
from __future__ import annotations

from loom.hookspecs import hookimpl
from loom.plugins.quant.schemes.base import check_kernels
from loom.plugins.quant.schemes.int8 import Int8W8A8
from loom.quant import QuantMethod


class Int8(QuantMethod):
    name = "int8"

    @classmethod
    def matches(cls, quantization_config):
        return False

    @classmethod
    def from_config(cls, quantization_config):
        if quantization_config:
            method = quantization_config.get("quant_method", "(no quant_method)")
            raise ValueError(f"quantization 'int8' quantizes an unquantized checkpoint while "
                             f"loading, but this checkpoint is already quantized with quant_method "
                             f"{method!r}; use 'auto' to run it as it is")
        return cls()

    def check_platform(self, platform, dtype):
        check_kernels(self.name, platform, "int8 W8A8")

    def for_layer(self, prefix):
        return Int8W8A8("online", static=False, symmetric=True)


@hookimpl
def loom_quant_methods():
    return [Int8]
