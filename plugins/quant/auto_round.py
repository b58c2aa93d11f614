"""AutoRound checkpoints (``quant_method: auto-round`` or ``intel/auto-round``): int weights in the
GPTQ layout (``packing_format`` auto_round:auto_gptq, v1 zeros; auto_round:gptqmodel, v2 zeros)
or the AWQ layout (auto_round:auto_awq); older checkpoints name the packing in ``backend``.
``extra_config`` overrides bits/group_size per layer (a module name, or a regular expression
searched in the names; bits >= 16 leaves the layer unquantized) and only the blocks of
``block_name_to_quantize`` are quantized. auto-round's gptq/awq/fp8 exports are ordinary
gptq/awq/fp8 checkpoints, loaded by those plugins."""
from __future__ import annotations

import re

from loom.hookspecs import hookimpl
from loom.plugins.quant.schemes.base import CheckpointMethod, Dense, same_for_all_parts
from loom.plugins.quant.schemes.wna16 import AWQLayout, GPTQLayout

QUANT_METHODS = ("auto-round", "intel/auto-round")
GPTQ_V1_BACKENDS = ("gptq", "exllamav2", "marlin", "triton", "qbits", "ipex")
REGEX_TOKENS = (".*", "^", "$", "|", "(", "[", "?", "+", "\\")   # as auto-round tells them apart


def packing(config: dict) -> str:
    """awq, gptq (v1 zeros) or gptq_v2 from packing_format, or the older backend key."""
    fmt = str(config.get("packing_format") or config.get("backend") or "auto_round:auto_gptq")
    if "awq" in fmt:
        return "awq"
    if "gptqmodel" in fmt:
        return "gptq_v2"
    if fmt in ("auto", "auto_round") or any(b in fmt for b in GPTQ_V1_BACKENDS):
        return "gptq"
    raise ValueError(f"auto-round: packing format {fmt!r} is not supported (auto_round:auto_gptq, "
                     "auto_round:gptqmodel, auto_round:auto_awq)")


class AutoRound(CheckpointMethod):
    name = "auto-round"
    quant_methods = QUANT_METHODS

    def __init__(self, config: dict):
        self.packing = packing(config)
        self.defaults = {"bits": int(config.get("bits", 4)),
                         "group_size": int(config.get("group_size", 128)),
                         "data_type": config.get("data_type", "int")}
        self.extra = config.get("extra_config") or {}
        blocks = config.get("block_name_to_quantize") or config.get("to_quant_block_names")
        self.blocks = blocks.split(",") if isinstance(blocks, str) else list(blocks or [])
        if int(config.get("act_bits", 16)) < 16:
            raise ValueError("auto-round: quantized activations are not supported (weight-only)")

    def for_layer(self, prefix):
        settings = same_for_all_parts(prefix, self.settings)
        if settings is None:
            return Dense()
        bits, group_size = settings
        if self.packing == "awq":
            return AWQLayout(bits, group_size)
        return GPTQLayout(bits, group_size, v1=self.packing == "gptq")

    def settings(self, name: str) -> tuple[int, int] | None:
        """(bits, group_size) of a checkpoint module; None: left unquantized."""
        if self.blocks and not any(name.startswith(f"{b}.") for b in self.blocks):
            return None
        values = dict(self.defaults, **self.override(name))
        if int(values["bits"]) >= 16:
            return None
        if values["data_type"] != "int":
            raise ValueError(f"auto-round: {name}: data_type {values['data_type']!r} is not "
                             "supported (int)")
        return int(values["bits"]), int(values["group_size"])

    def override(self, name: str) -> dict:
        if name in self.extra:
            return self.extra[name]
        for pattern, values in self.extra.items():
            if any(t in pattern for t in REGEX_TOKENS) and re.search(pattern, name):
                return values
        return {}


@hookimpl
def loom_quant_methods():
    return [AutoRound]
