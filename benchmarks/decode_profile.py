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


def kernel_us(llm: LLM, prompts, max_tokens: int) -> dict[str, float]:
    """Summed CUDA kernel time (us) by kernel name over one generate."""
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
    return totals


def step_kernels(llm: LLM, prompts, steps: int) -> list[list[tuple[str, float, float]]]:
    """The decode steps of a generate of 1 + steps tokens, each the list of its kernels as (name,
    time, idle gap before it) in us; the time counts from the previous kernel's end where it
    started earlier (a programmatic dependent launch), so times and gaps add up to the step. A gap over 50 us (the host between steps) starts a step; the
    steps whose kernel count is the most common one are kept (the prefill differs)."""
    params = SamplingParams(temperature=0, max_tokens=1 + steps, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        sync()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    found, last_end = [], None
    for start, end, name in kernels:
        gap = None if last_end is None else start - last_end
        if gap is None or gap > 50:
            found.append([])
            gap = 0.0
        found[-1].append((name, end - max(start, last_end or start), max(gap, 0.0)))
        last_end = end if last_end is None else max(last_end, end)
    common = collections.Counter(len(k) for k in found).most_common(1)[0][0]
    return [k for k in found if len(k) == common]


def timeline(llm: LLM, prompts, steps: int) -> dict:
    """Where a decode step's time goes, kernel by kernel, on the device's own clock: each
    kernel's time and the idle gap before it, averaged over steps; and, for the repeating part
    (the layers), averaged over layers by position in the layer."""
    found = step_kernels(llm, prompts, steps)
    n = len(found[0])
    mean = [(found[0][i][0], sum(s[i][1] for s in found) / len(found),
             sum(s[i][2] for s in found) / len(found)) for i in range(n)]
    names = [m[0] for m in mean]
    middle = range(n // 4, n // 2)
    period = next((p for p in range(2, n // 4) if all(names[i] == names[i + p] for i in middle)),
                  None)
    layer = []
    if period:
        reps = [i for i in range(n) if all(names[i + o] == names[n // 4 + o] for o in range(period))
                and i + period <= n]
        for o in range(period):
            layer.append({"kernel": names[n // 4 + o],
                          "us": round(sum(mean[i + o][1] for i in reps) / len(reps), 2),
                          "gap_before_us": round(sum(mean[i + o][2] for i in reps) / len(reps), 2)})
    return {"steps": len(found), "kernels_per_step": n,
            "busy_us": round(sum(m[1] for m in mean), 1), "gaps_us": round(sum(m[2] for m in mean), 1),
            "layers": len(reps) if period else 0, "per_layer": layer,
            "step": [{"kernel": k, "us": round(t, 2), "gap_before_us": round(g, 2)}
                     for k, t, g in mean]}


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
    ap.add_argument("--timeline", action="store_true",
                    help="with --graphs: kernel time and the idle gap before each kernel, by name")
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
    if args.timeline:
        t = figures["timeline"] = timeline(llm, prompts, args.steps)
        print(f"timeline ({figures['profiled']}, {t['steps']} steps of {t['kernels_per_step']} "
              f"kernels): {t['busy_us']} us busy + {t['gaps_us']} us gaps per step; one layer "
              f"of {t['layers']}:")
        for r in t["per_layer"]:
            print(f"  {r['us']:8.2f} us  gap {r['gap_before_us']:6.2f} us  {r['kernel']}")
        print("  outside the layers:")
        outside = t["step"][:3] + t["step"][-6:]
        for r in outside:
            print(f"  {r['us']:8.2f} us  gap {r['gap_before_us']:6.2f} us  {r['kernel']}")
        write_json(args, values, figures)
        return
    kernel_us(llm, prompts, 2)                                   # warm-up
    base = kernel_us(llm, prompts, 1)
    full = kernel_us(llm, prompts, 1 + args.steps)
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
    write_json(args, values, figures)


def write_json(args, values: dict, figures: dict) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "decode_profile", "commit": git_commit(),
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "command": ["python", "benchmarks/decode_profile.py", *sys.argv[1:]],
                       "config": values, "batch_size": args.batch_size,
                       "input_len": args.input_len, "figures": figures}, f, indent=1)


if __name__ == "__main__":
    main()
