"""The same workload through Hugging Face transformers' ``generate``: the baseline of --compare hf.

The model is built on loom's device in loom's dtype: ``from_config`` with loom's dummy weights
when loom used ``load-format: dummy``, else ``from_pretrained`` of the model directory. Each
generation is timed like loom's (a host clock after a device synchronize) through a streamer
that ``generate`` hands every step's tokens to.
"""
from __future__ import annotations

import logging
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CompileConfig
from transformers.generation.streamers import BaseStreamer

from loom.bench.common import Run, Target
from loom.config import EngineConfig
from loom.loader import fill_dummy_weights

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4
    from transformers.modeling_utils import no_init_weights

logger = logging.getLogger("loom")

PAD = 0


def load_model(config: EngineConfig, target: Target):
    if config.load_format != "dummy":
        model = AutoModelForCausalLM.from_pretrained(target.model_path, dtype=target.dtype)
        return model.to(target.device).eval()
    hf_config = AutoConfig.from_pretrained(target.model_path)
    # Built in place on the device, with no random init: loom's dummy fill is the only pass.
    with torch.device(target.device), no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=target.dtype)
    model.tie_weights()
    fill_dummy_weights(model, config.seed)
    return model.eval()


def static_compiled() -> dict:
    """generate() arguments for HF's static KV cache with the decode forward compiled
    (torch.compile mode reduce-overhead, fullgraph: CUDA graphs on a GPU).

    Not ``model.forward = torch.compile(...)``: that compiles the prefill too, inside which
    transformers 5 allocates the StaticCache without mark_static_address, and CUDA graphs are
    then skipped for the cache's in-place updates."""
    compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    compile_config._compile_all_devices = True   # HF's switch to compile off-GPU (the CPU tests)
    return {"cache_implementation": "static", "compile_config": compile_config}


class StepClock(BaseStreamer):
    """perf_counter at each step's tokens; generate copies them to the host first (a sync)."""

    def __init__(self):
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True               # the first put is the prompt

    def end(self) -> None:
        pass


def generate(model, prompts: list[list[int]], output_len: int, target: Target,
             **kwargs) -> tuple[Run, int]:
    """One batch, left-padded; its clock and the number of tokens generated."""
    clock = StepClock()
    target.platform.synchronize()
    start = time.perf_counter()
    input_ids, mask = left_pad(prompts, target.device)
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=output_len,
                         min_new_tokens=output_len, do_sample=False, pad_token_id=PAD,
                         streamer=clock, **kwargs)
    target.platform.synchronize()
    end = time.perf_counter()
    generated = (out.shape[1] - input_ids.shape[1]) * out.shape[0]
    return Run(start, end, clock.stamps, 0, 1), generated


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def guarded(name: str, fn):
    """fn's result, or {"error": ...} once the failure is logged: a failing HF run costs its
    own figures, never loom's."""
    try:
        return fn()
    except Exception as e:
        logger.exception("--compare hf: %s failed", name)
        return {"error": f"{type(e).__name__}: {e}"}
