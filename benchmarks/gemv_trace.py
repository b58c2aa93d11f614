"""The timeline of the native int4 GEMVs inside a replayed batch-1 decode graph.

With the tracing build (LOOM_NATIVE_TRACE=1, set here) every block of every GEMV records the
%globaltimer at its start, after griddepcontrol.wait (the kernel before it has finished), after x
is staged, after its tiles and at its end. The profiler sees no kernels inside graph replays, so
this is how the parts of one GEMV show. Per linear (told apart by W's [N, K]), the median over the
layers of:

  span        first wait returned -> last block done: the kernel's own time on the critical path
  lead        first block started -> first wait returned: how early PDL let it start
  pre_wait    waited - start, the median over the blocks (their weights' head start)
  wait_skew   last wait returned - first: how long "the kernel before is done" takes to reach all
  staging     staged - waited (median and max over the blocks)
  tiles       looped - staged (median and max over the blocks)
  tail        last done - median done: the blocks that finish late
  gap_before  first wait returned - the previous GEMV's last done (the kernels between, e.g.
              attention before o_proj, and the completion signal)
  GB/s        W's bytes (packed weights, scales, zeros) / span

    python benchmarks/gemv_trace.py --config configs/llama3-8b-gptq.yaml --json X.json
    python benchmarks/gemv_trace.py --records records.pt   # analyse saved records again
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

FIELDS = ("start", "waited", "staged", "looped", "done", "n", "k", "block", "sm")


def kernels(records: torch.Tensor) -> list[dict]:
    """The GEMV launches in the records ([R, 8] int64 rows as written by the kernel, any order):
    blocks grouped by launch, in launch order. All blocks of a launch start before any block of
    the next one (a dependent launches only after every block of the one before has started), and
    consecutive launches of a decode step differ in [N, K]."""
    rows = sorted(records.tolist(), key=lambda r: r[0])
    launches: list[dict] = []
    for r in rows:
        rec = dict(zip(FIELDS, r[:5] + [r[5] & 0xffffffff, r[5] >> 32,
                                        r[6] & 0xffffffff, r[6] >> 32]))
        shape = (rec["n"], rec["k"])
        if not launches or launches[-1]["shape"] != shape:
            launches.append({"shape": shape, "blocks": []})
        launches[-1]["blocks"].append(rec)
    return launches


def launch_figures(blocks: list[dict], previous_done: int | None, weight_bytes: int) -> dict:
    """us figures of one launch (see the module docstring)."""
    first_wait = min(b["waited"] for b in blocks)
    last_done = max(b["done"] for b in blocks)
    staging = [b["staged"] - b["waited"] for b in blocks]
    tiles = [b["looped"] - b["staged"] for b in blocks]
    span = last_done - first_wait
    figures = {
        "span": span, "lead": first_wait - min(b["start"] for b in blocks),
        "pre_wait": statistics.median(b["waited"] - b["start"] for b in blocks),
        "wait_skew": max(b["waited"] for b in blocks) - first_wait,
        "staging": statistics.median(staging), "staging_max": max(staging),
        "tiles": statistics.median(tiles), "tiles_max": max(tiles),
        "tail": last_done - statistics.median(b["done"] for b in blocks),
    }
    if previous_done is not None:
        figures["gap_before"] = first_wait - previous_done
    figures = {k: v / 1e3 for k, v in figures.items()}
    figures["gbs"] = weight_bytes / span if span > 0 else float("nan")   # bytes / ns = GB/s
    figures["blocks"] = len(blocks)
    late = sorted(blocks, key=lambda b: b["done"])[-4:]
    figures["last_blocks"] = [b["block"] for b in late]
    return figures


def weight_bytes(n: int, k: int, group_size: int) -> int:
    """Packed int4 weights plus bf16 scales and zeros of W [N, K]."""
    groups = max(1, k // group_size) if group_size > 0 else 1
    return n * k // 2 + 2 * 2 * n * groups


def summarize(records: torch.Tensor, names: dict[tuple[int, int], str], group_size: int,
              skip_first: int) -> dict:
    """Median figures per linear over its launches (the first `skip_first` launches, the warm-up
    edge of a replay, left out), and the timer's resolution seen in the records."""
    launches = kernels(records)
    per_linear: dict[str, list[dict]] = {}
    previous_done = None
    for i, launch in enumerate(launches):
        n, k = launch["shape"]
        figures = launch_figures(launch["blocks"], previous_done, weight_bytes(n, k, group_size))
        previous_done = max(b["done"] for b in launch["blocks"])
        if i >= skip_first:
            per_linear.setdefault(names.get((n, k), f"{n}x{k}"), []).append(figures)
    summary = {}
    for name, rows in per_linear.items():
        keys = [k for k in rows[0] if k != "last_blocks" and all(k in r for r in rows)]
        summary[name] = {k: statistics.median(r[k] for r in rows) for k in keys}
        summary[name]["launches"] = len(rows)
        summary[name]["last_blocks_first_launch"] = rows[0]["last_blocks"]
    stamps = sorted({int(v) for v in records[:, :5].flatten().tolist()})
    steps = [b - a for a, b in zip(stamps, stamps[1:]) if b > a]
    return {"linears": summary, "launches": len(launches),
            "timer_step_ns": min(steps) if steps else None}


def print_summary(summary: dict) -> None:
    cols = ("span", "lead", "pre_wait", "wait_skew", "staging", "staging_max", "tiles", "tiles_max", "tail",
            "gap_before", "gbs")
    print(f"{'linear':10s} " + " ".join(f"{c:>11s}" for c in cols))
    for name, f in summary["linears"].items():
        print(f"{name:10s} " + " ".join(f"{f.get(c, float('nan')):11.2f}" for c in cols)
              + f"   last blocks {f['last_blocks_first_launch']}")
    print(f"{summary['launches']} launches; the timer moves in steps of {summary['timer_step_ns']} ns")


def linear_names(model) -> dict[tuple[int, int], str]:
    """[N, K] of each int4 linear of the first layer -> its name (qkv_proj, o_proj, ...)."""
    names = {}
    for name, module in model.model.layers[0].named_modules():
        w_q = getattr(module, "w_q", None)
        if isinstance(w_q, torch.Tensor) and w_q.dim() == 2:
            names[(w_q.shape[0], w_q.shape[1] * 8)] = name.split(".")[-1]
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/llama3-8b-gptq.yaml")
    ap.add_argument("--context-len", type=int, default=256)
    ap.add_argument("--replays", type=int, default=3, help="graph replays recorded")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--records", help="analyse these saved records instead of running")
    ap.add_argument("--save-records", help="save the raw records here (torch.save)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.records:
        saved = torch.load(args.records)
        summary = summarize(saved["records"], {tuple(k): v for k, v in saved["names"]},
                            args.group_size, skip_first=4)
        print_summary(summary)
        return
    os.environ["LOOM_NATIVE_TRACE"] = "1"
    from decode_ablation import capture

    from loom import LLM
    from loom.bench.common import script_header
    from loom.config import read_yaml
    from loom.plugins.quant.native import wna16_gemv

    values = read_yaml(args.config)
    model = values.pop("model")
    llm = LLM(model, **{**values, "cuda-graph-sizes": [1]})
    runner = llm.engine.core.executor.runner
    names = linear_names(runner.model)
    with torch.inference_mode():
        graph, graphs = capture(runner, args.context_len, 1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        step_ms = start.elapsed_time(end) / 10
        layers = len(runner.model.model.layers)
        buffer = wna16_gemv.trace_start(args.replays * layers * 4 * 512, torch.device("cuda"))
        for _ in range(args.replays):
            graph.replay()
        records = wna16_gemv.trace_stop(buffer)
    if args.save_records:
        torch.save({"records": records, "names": [[list(k), v] for k, v in names.items()]},
                   args.save_records)
    summary = summarize(records, names, args.group_size, skip_first=4)
    print(f"{args.config}: traced forward {step_ms:.3f} ms (graph replays, tracing build)")
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**script_header("gemv_trace", "benchmarks/gemv_trace.py", sys.argv[1:]),
                       "context_len": args.context_len, "replays": args.replays,
                       "traced_forward_ms": step_ms, **summary}, f, indent=1)


if __name__ == "__main__":
    main()
