"""Host time of one Scheduler.schedule() + update() with N running decode requests, no model.

    python benchmarks/scheduler_overhead.py [--num-requests 256] [--steps 2000] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from loom.kv_cache import KVCacheManager
from loom.request import Request
from loom.sampling_params import SamplingParams
from loom.scheduler import Scheduler
from loom.scheduler_output import ModelRunnerOutput


def build(num_requests: int, prompt_len: int, block_size: int):
    max_len = prompt_len + 100_000
    blocks = num_requests * (max_len // block_size + 1)
    kv = KVCacheManager(blocks, block_size, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_seqs=num_requests, max_num_batched_tokens=1 << 30,
                      max_model_len=max_len)
    params = SamplingParams(max_tokens=100_000, temperature=0)
    for i in range(num_requests):
        prompt = [(i * 7919 + j) % 32000 for j in range(prompt_len)]
        sched.add_request(Request(str(i), prompt, params, frozenset([2]), max_tokens=100_000))
    out = sched.schedule()                      # the prefill step
    sched.update(out, fake_result(out))
    return sched


def fake_result(out) -> ModelRunnerOutput:
    ids = list(out.num_scheduled_tokens)
    return ModelRunnerOutput(ids, [[(len(r) * 31) % 32000 + 3] for r in ids], [None] * len(ids))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    sched = build(args.num_requests, args.prompt_len, args.block_size)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        result = fake_result(out)
        sched.update(out, result)
        times.append(time.perf_counter() - t0)
        assert len(out.num_scheduled_tokens) == args.num_requests
    times = times[args.steps // 10:]            # warm-up
    ms = sorted(t * 1e3 for t in times)
    figures = {"num_requests": args.num_requests, "steps": len(ms),
               "mean_ms": statistics.fmean(ms), "median_ms": statistics.median(ms),
               "p99_ms": ms[int(0.99 * (len(ms) - 1))]}
    print(f"schedule()+update() with {args.num_requests} running decodes: "
          f"mean {figures['mean_ms']:.3f} ms, median {figures['median_ms']:.3f} ms, "
          f"p99 {figures['p99_ms']:.3f} ms (target <= 1 ms)")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        record = {"benchmark": "scheduler_overhead", "commit": commit,
                  "device": "host CPU (no model)",
                  "command": "python benchmarks/scheduler_overhead.py " + " ".join(
                      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                      if k != "json"),
                  "figures": figures}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
