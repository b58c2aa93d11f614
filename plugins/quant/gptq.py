"""GPTQ checkpoints (``quant_method: gptq``), as AutoGPTQ, GPTQModel and auto-round's gptq export
write them: 4 or 8 bits, any group size, sym or not, desc_act with a g_idx, zeros stored as
zero - 1 (``checkpoint_format``/``format`` gptq, v1) or as they are (gptq_v2), GPTQModel's
``dynamic`` per-module overrides (``-:regex`` leaves a module unquantized)."""
from __future__ import annotations

import re

from loom.hookspecs import hookimpl
from loom.plugins.quant.schemes.base import CheckpointMethod, Dense, same_for_all_parts
from loom.plugins.quant.schemes.wna16 import GPTQLayout

FORMATS = ("gptq", "gptq_v2")


class GPTQ(CheckpointMethod):
    name = "gptq"
    quant_methods = ("gptq",)

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
