"""Where a decode step's GPU time goes: CUDA kernel time per decode step, by kernel, for a
config (Llama-3-8B shape by default), measured with torch.profiler on eager steps (``--graphs``:
on the graph-replayed steps themselves, whose kernels can differ, e.g. split-KV attention).

Two generates of the same prompts are profiled, one with 1 output token (prefill only) and one
with 1 + N; their difference over N is one batch's decode step. Kernels are grouped by name
(the first 60 characters). The graph-replayed step time of the same batch (the config as given,
graphs on) is measured in the same run, so the gap between summed kernel time and the replayed
step (launch gaps and kernel tails) shows too.

    python benchmarks/decode_profile.py --config configs/llama3-8b.yaml --batch-size 1 --json X.json
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from loom import LLM, SamplingParams
from loom.bench.common import git_commit
from loom.config import read_yaml


def parse_value(value: str):
    """A --set value: JSON where it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernel_us(llm: LLM, prompts, max_tokens: int, timeline: list | None = None
              ) -> dict[str, float]:
    """Summed CUDA kernel time (us) by kernel name over one generate; ``timeline`` (a list)
    receives every kernel as (start us, end us, name), in start order."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    sync()
    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        sync()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:60]] += event.device_time_total if hasattr(
                event, "device_time_total") else event.cuda_time_total
            if timeline is not None:
                timeline.append((event.time_range.start, event.time_range.end, event.name))
    if timeline is not None:
        timeline.sort()
    return totals


def layer_window(timeline: list, count: int) -> list[dict]:
    """``count`` consecutive kernels from the middle of the last decode step (the last half of
    the timeline's kernels is decode), each with its duration and the gap since the one before
    ended (negative: they overlapped, e.g. under programmatic dependent launch)."""
    first = max(1, len(timeline) - len(timeline) // 4)
    window = timeline[first - 1:first + count]
    return [{"kernel": name[:60], "us": round(end - start, 2),
             "gap_us": round(start - window[i][1], 2)}
            for i, (start, end, name) in enumerate(window[1:])]


def step_ms(llm: LLM, prompts, n: int) -> float:
    """Wall time per decode step: generate 1 + n tokens minus generate 1, over n."""
    def timed(tokens):
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        sync()
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        sync()
        return time.perf_counter() - t0
    timed(1 + n)
    return (min(timed(1 + n) for _ in range(3)) - min(timed(1) for _ in range(3))) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/llama3-8b.yaml")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides (YAML values), e.g. kv-cache-dtype=fp8")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--graphs", action="store_true",
                    help="profile the graph-replayed steps instead of eager ones")
    ap.add_argument("--timeline", type=int, default=0, metavar="N",
                    help="also list N consecutive kernels of a decode step with their gaps")
    ap.add_argument("--json")
    args = ap.parse_args()
    values = read_yaml(args.config)
    for item in args.set:
        key, _, value = item.partition("=")
        values[key] = parse_value(value)
    model = values.pop("model")
    gen = torch.Generator().manual_seed(0)
    vocab = json.load(open(f"{model}/config.json"))["vocab_size"]
    prompts = [torch.randint(vocab // 10, vocab // 2, (args.input_len,), generator=gen).tolist()
               for _ in range(args.batch_size)]
    figures = {}
    llm = LLM(model, **values)
    figures["graph_step_ms"] = step_ms(llm, prompts, args.steps)
    if not args.graphs:
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        llm = LLM(model, **{**values, "enforce-eager": True})
        figures["eager_step_ms"] = step_ms(llm, prompts, args.steps)
    figures["profiled"] = "graph replays" if args.graphs else "eager steps"
    kernel_us(llm, prompts, 2)                                   # warm-up
    base = kernel_us(llm, prompts, 1)
    timeline: list = []
    full = kernel_us(llm, prompts, 1 + args.steps, timeline)
    if args.timeline:
        figures["timeline"] = layer_window(timeline, args.timeline)
    per_step = {k: (full[k] - base.get(k, 0.0)) / args.steps for k in full}
    rows = sorted(((k, v) for k, v in per_step.items() if v > 0.05), key=lambda r: -r[1])
    total = sum(v for _, v in rows) or 1e-9
    figures["kernel_us_per_step"] = round(total, 1)
    figures["kernels"] = [{"kernel": k, "us": round(v, 2), "share": round(v / total, 4)}
                          for k, v in rows]
    eager = f", eager step {figures['eager_step_ms']:.3f} ms" if "eager_step_ms" in figures else ""
    print(f"batch {args.batch_size}: graph step {figures['graph_step_ms']:.3f} ms{eager}, "
          f"kernels {total / 1e3:.3f} ms per step ({figures['profiled']})")
    for r in figures["kernels"][:args.top]:
        print(f"  {r['us']:9.1f} us  {100 * r['share']:5.1f}%  {r['kernel']}")
    for r in figures.get("timeline", []):
        print(f"  gap {r['gap_us']:6.2f} us  {r['us']:7.2f} us  {r['kernel']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "decode_profile", "commit": git_commit(),
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "command": ["python", "benchmarks/decode_profile.py", *sys.argv[1:]],
                       "config": values, "batch_size": args.batch_size,
                       "input_len": args.input_len, "figures": figures}, f, indent=1)


if __name__ == "__main__":
    main()
