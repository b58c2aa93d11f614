"""What each part of a decode step costs inside the replayed graph: a batch-1 decode graph is
captured again with a part left out, and replayed back to back (device time only).

Parts: "attention" (the rotary, the KV-cache write and the attention itself: forward_rotary
returns q), each linear of the layers (it returns an empty tensor: no GEMV/GEMM, nor the norm or
SiLU-and-mul a fused int4 GEMV would apply), all of them, and the split-KV reduction (one split
instead). The profiler sees no kernels inside graph replays here, so leaving parts out is how
their in-graph cost shows: the full step minus the step without the part. One graph holds
--repeat forwards: launching a graph costs the H200's host about 0.7 ms (run 50), so a graph of
one short forward would time the host.

    python benchmarks/decode_ablation.py --config configs/llama3-8b-gptq.yaml --json X.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

from loom import LLM
from loom.bench.common import script_header
from loom.config import read_yaml
from loom.cuda_graphs import DecodeGraphs
from loom.models.layers import Linear, RowParallelLinear
from loom.quant import FusedInput


@contextlib.contextmanager
def without_attention(backend):
    backend.forward_rotary = lambda positions, rotary_emb, q, k, v, kv_cache, metadata: q
    try:
        yield
    finally:
        del backend.forward_rotary


@contextlib.contextmanager
def without_linears(suffix: str = ""):
    """Linears whose prefix ends with ``suffix`` (all: "") return an empty tensor (of half the
    columns where they were to apply SiLU-and-mul to their output)."""
    originals = [(cls, name, cls.__dict__[name]) for cls, name in (
        (Linear, "forward"), (RowParallelLinear, "forward"), (Linear, "forward_fused_output"))]

    def patched(original, columns):
        def maybe_empty(self, x, *op):
            if not self.prefix.endswith(suffix):
                return original(self, x, *op)
            t = x.x if isinstance(x, FusedInput) else x
            return torch.empty(t.shape[0], columns(self), dtype=t.dtype, device=t.device)
        return maybe_empty
    for cls, name, original in originals:
        cls_columns = ((lambda lin: lin.output_size // 2) if name == "forward_fused_output"
                       else (lambda lin: lin.output_size))
        setattr(cls, name, patched(original, cls_columns))
    try:
        yield
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)


@contextlib.contextmanager
def kv_splits(backend, splits: int):
    saved = backend.kv_splits
    backend.kv_splits = splits
    try:
        yield
    finally:
        backend.kv_splits = saved


def capture(runner, context_len: int, repeat: int):
    """A graph of `repeat` batch-1 decode forwards at context_len, captured now over DecodeGraphs'
    buffers (no KV written), replayed 3 times; returns (graph, the DecodeGraphs it reads)."""
    graphs = DecodeGraphs(runner, [1])
    blocks = -(-context_len // runner.block_size)
    graphs.seq_lens[0] = context_len
    graphs.block_tables[0, :blocks] = torch.arange(blocks, dtype=torch.int32)
    graphs.positions[0] = context_len - 1
    graphs.slot_mapping.fill_(-1)
    metadata = runner.attn.build_graph_metadata(
        graphs._common(1, torch.full((1,), context_len, dtype=torch.int32), None))
    platform = runner.platform
    graph = platform.make_graph()
    with platform.graph_capture() as stream:
        graphs._forward(1, metadata)
        with platform.capture(graph, None, stream):
            for _ in range(repeat):
                graphs._forward(1, metadata)
    for _ in range(3):
        graph.replay()
    return graph, graphs


def step_ms(runner, context_len: int, steps: int, repeat: int) -> float:
    """ms per batch-1 decode forward at context_len: a graph of `repeat` forwards captured now
    (capture), replayed back to back."""
    graph, graphs = capture(runner, context_len, repeat)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    end.synchronize()
    del graph, graphs
    return start.elapsed_time(end) / steps / repeat


def apply_setting(setting: str) -> None:
    """Environment knobs "K=V,K=V" ("default": none) for the next captures (knobs read at each
    call, e.g. LOOM_NATIVE_PDL, LOOM_TRITON_PDL)."""
    for key in SETTING_KEYS:
        os.environ.pop(key, None)
    if setting != "default":
        for item in setting.split(","):
            key, _, value = item.partition("=")
            SETTING_KEYS.add(key)
            os.environ[key] = value


SETTING_KEYS: set[str] = set()


def breakdown(figures: dict, num_layers: int) -> dict:
    """us a layer of each part left out: the full step minus the step without it."""
    full = figures["full"]
    parts = {name[3:]: full - ms for name, ms in figures.items() if name.startswith("no_")}
    if "no_attention_no_linears" in figures:
        parts["rest"] = figures["no_attention_no_linears"]
    if "one_kv_split" in figures:
        parts["split_reduction"] = full - figures["one_kv_split"]
    return {k: v * 1e3 / num_layers for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/llama3-8b.yaml")
    ap.add_argument("--context-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=8, help="forwards per captured graph")
    ap.add_argument("--variants", nargs="*", help="the variants to time (default: all)")
    ap.add_argument("--settings", nargs="*", default=["default"],
                    help='environment knobs per round, "K=V,K=V" or "default"')
    ap.add_argument("--json")
    args = ap.parse_args()
    values = read_yaml(args.config)
    model = values.pop("model")
    llm = LLM(model, **{**values, "cuda-graph-sizes": [1]})
    runner = llm.engine.core.executor.runner
    backend = runner.attn
    num_layers = len(runner.model.model.layers)
    variants = {
        "full": [],
        "no_attention": [lambda: without_attention(backend)],
        **{f"no_{name}": [lambda name=name: without_linears(name)]
           for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")},
        "no_linears": [without_linears],
        "no_attention_no_linears": [lambda: without_attention(backend), without_linears],
        "one_kv_split": [lambda: kv_splits(backend, 1)],
        **{f"kv_splits_{n}": [lambda n=n: kv_splits(backend, n)] for n in (2, 4, 8, 32)},
    }
    chosen = ["full"] + [v for v in (args.variants or variants) if v != "full"]
    results = {}
    with torch.inference_mode():
        for setting in args.settings:
            apply_setting(setting)
            figures = {}
            for name in chosen:
                with contextlib.ExitStack() as stack:
                    for patch in variants[name]:
                        stack.enter_context(patch())
                    figures[name] = step_ms(runner, args.context_len, args.steps, args.repeat)
            per_layer = breakdown(figures, num_layers)
            results[setting] = {"step_ms": figures, "us_per_layer": per_layer}
            print(f"{args.config} [{setting}], batch 1, context {args.context_len}: "
                  f"step {figures['full']:.3f} ms")
            for name, ms in figures.items():
                if name != "full":
                    saved = (figures["full"] - ms) * 1e3 / num_layers
                    print(f"  {name:26s} {ms:.3f} ms  {saved:6.1f} us a layer less than full")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**script_header("decode_ablation", "benchmarks/decode_ablation.py",
                                     sys.argv[1:]),
                       "context_len": args.context_len, "repeat": args.repeat,
                       "settings": results}, f, indent=1)


if __name__ == "__main__":
    main()
