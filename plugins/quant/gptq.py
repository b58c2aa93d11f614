"""GPTQ checkpoints (``quant_method: gptq``), as AutoGPTQ, GPTQModel and auto-round's gptq export
write them: 4 or 8 bits, any group size, sym or not, desc_act with a g_idx, zeros stored as
zero - 1 (``checkpoint_format``/``format`` gptq, v1) or as they are (gptq_v2), GPTQModel's
``dynamic`` per-module overrides (``-:regex`` leaves a module unquantized)."""
from __future__ import annotations

import re

from loom.hookspecs import hookimpl
from loom.plugins.quant.schemes.base import (Dense, check_kernels, checkpoint_config,
                                             same_for_all_parts)
from loom.plugins.quant.schemes.wna16 import GPTQLayout
from loom.quant import QuantMethod

FORMATS = ("gptq", "gptq_v2")


class GPTQ(QuantMethod):
    name = "gptq"

    def __init__(self, config: dict):
        self.bits = int(config.get("bits", 4))
        self.group_size = int(config.get("group_size", 128))
        self.desc_act = bool(config.get("desc_act", False))
        self.format = config.get("checkpoint_format") or config.get("format") or "gptq"
        self.dynamic = config.get("dynamic") or {}
        if self.format not in FORMATS:
            raise ValueError(f"gptq: checkpoint_format {self.format!r} is not supported "
                             f"({', '.join(FORMATS)})")
        if config.get("lm_head"):
            raise ValueError("gptq: a quantized lm_head is not supported")

    @classmethod
    def matches(cls, quantization_config):
        return bool(quantization_config) and quantization_config.get("quant_method") == "gptq"

    @classmethod
    def from_config(cls, quantization_config):
        return cls(checkpoint_config(cls, quantization_config))

    def check_platform(self, platform, dtype):
        check_kernels(self.name, platform, "int4/int8 weight-only")

    def for_layer(self, prefix):
        settings = same_for_all_parts(prefix, self.settings)
        if settings is None:
            return Dense()
        bits, group_size, desc_act = settings
        return GPTQLayout(bits, group_size, v1=self.format == "gptq", desc_act=desc_act)

    def settings(self, name: str) -> tuple[int, int, bool] | None:
        """(bits, group_size, desc_act) of a checkpoint module after the first ``dynamic``
        pattern that matches it; None: left unquantized."""
        values = {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act}
        for pattern, overrides in self.dynamic.items():
            if re.match(pattern.removeprefix("-:").removeprefix("+:"), name):
                if pattern.startswith("-:"):
                    return None
                values.update({k: v for k, v in overrides.items() if k in values})
                break
        return int(values["bits"]), int(values["group_size"]), bool(values["desc_act"])


@hookimpl
def loom_quant_methods():
    return [GPTQ]
