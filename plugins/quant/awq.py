"""AWQ checkpoints (``quant_method: awq``, the GEMM version), as AutoAWQ and auto-round's awq
export write them: 4-bit, grouped, with zero points; ``modules_to_not_convert`` names (substrings
of module names) left unquantized."""
from __future__ import annotations

from loom.hookspecs import hookimpl
from loom.plugins.quant.schemes.base import CheckpointMethod, Dense, same_for_all_parts
from loom.plugins.quant.schemes.wna16 import AWQLayout


class AWQ(CheckpointMethod):
    name = "awq"
    quant_methods = ("awq",)

    def __init__(self, config: dict):
        self.bits = int(config.get("bits") or config.get("w_bit") or 4)
        self.group_size = int(config.get("group_size") or config.get("q_group_size") or 128)
        self.skip = list(config.get("modules_to_not_convert") or [])
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq: version {version!r} is not supported (gemm)")
        if not config.get("zero_point", True):
            raise ValueError("awq: checkpoints without zero points are not supported")

    def for_layer(self, prefix):
        if same_for_all_parts(prefix, lambda name: any(s in name for s in self.skip)):
            return Dense()
        return AWQLayout(self.bits, self.group_size)


@hookimpl
def loom_quant_methods():
    return [AWQ]
