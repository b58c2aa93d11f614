"""`loom bench latency`: one batch of random prompts at a time through the engine's step loop.

Per batch size: end-to-end latency, prefill time (until every request has its first token),
the median decode step and decode tok/s; at batch 1 also the memory roofline: weight bytes over
the copy bandwidth measured in this run. With --speculative, speculative decoding against plain
decoding instead (bench/spec_decode.py).
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from loom.bench import spec_decode
from loom.bench.common import (Run, Target, add_result_args, copy_bandwidth, format_table, greedy,
                               ms, random_prompts, ratio, require_positive, run_requests,
                               start_engine, startup_line, step_profile, summarize, write_record)
from loom.config import EngineConfig
from loom.sampler import argmax

NAME = "latency"
HELP = "latency of one batch at a time: end to end, prefill, decode step, roofline share"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=30)
    parser.add_argument("--num-iters-warmup", type=int, default=10)
    parser.add_argument("--copy-gib", type=float, default=2.0,
                        help="size of the device-to-device copy that measures the bandwidth")
    parser.add_argument("--hf-num-iters", type=int, default=5, help="timed HF runs (--compare hf)")
    parser.add_argument("--hf-num-iters-warmup", type=int, default=2)
    parser.add_argument("--hf-static", action=argparse.BooleanOptionalAction, default=True,
                        help="at batch 1, also HF with its static cache and compiled decode")
    spec_decode.add_args(parser)
    add_result_args(parser)


def prompts_for(seed: int, batch_size: int, iteration: int, input_len: int,
                vocab_size: int) -> list[list[int]]:
    """Fresh prompts every iteration (no prefix-cache hits), the same ones for loom and HF."""
    rng = np.random.default_rng([seed, batch_size, iteration])
    return random_prompts(rng, batch_size, input_len, vocab_size)


def main(config: EngineConfig, args: argparse.Namespace) -> int:
    require_positive(args, "batch_size", "input_len", "output_len", "num_iters", "hf_num_iters",
                     "copy_gib")
    if config.speculative is not None:
        if args.compare:
            raise ValueError("--compare: not with --speculative (it compares with plain "
                             "decoding)")
        figures, target = spec_decode.run(config, args)
        write_record(NAME, config, args, target, figures)
        print(spec_decode.table(figures))
        return 0
    batches, target, startup = run_loom(config, args)
    target.free()
    if 1 in batches:
        size = int(args.copy_gib * (1 << 30))
        bandwidth = copy_bandwidth(target.device, target.platform.synchronize, size)
        target.free()
        batches[1]["roofline"] = roofline(target.weight_bytes, bandwidth, batches[1])
    figures = {"input_len": args.input_len, "output_len": args.output_len,
               "num_iters": args.num_iters, "num_iters_warmup": args.num_iters_warmup,
               "startup": startup, "batches": list(batches.values())}
    if args.compare == "hf":
        from loom.bench.hf_compare import guarded

        failure = guarded("loading the model", lambda: run_hf(config, args, target, batches))
        if failure:
            figures["hf_error"] = failure["error"]
        target.free()
    write_record(NAME, config, args, target, figures)
    print(startup_line(figures["startup"]))
    print(table(figures["batches"]))
    for b in figures["batches"]:
        if b.get("device_step_ms") and b.get("decode_device_wait_share") is not None:
            d = b["device_step_ms"]
            print(f"batch {b['batch_size']}: decode graph replayed back to back {d['graph']:.3f} "
                  f"ms, with logits and argmax {d['graph_logits_argmax']:.3f} ms; the host waited "
                  f"for the device {b['decode_device_wait_share']:.0%} of the decode steps")
    return 0


def run_loom(config: EngineConfig, args: argparse.Namespace) -> tuple[dict, Target, dict]:
    engine, target = start_engine(config)
    params = greedy(args.output_len)
    batches, first_token = {}, None
    for batch_size in args.batch_size:
        runs = []
        for i in range(args.num_iters_warmup + args.num_iters):
            prompts = prompts_for(config.seed, batch_size, i, args.input_len, target.vocab_size)
            runs.append(run_requests(engine, prompts, params))
        if first_token is None:
            first_token = runs[0].stamps[runs[0].first_token_step]
        timed = runs[args.num_iters_warmup:]
        batches[batch_size] = {"batch_size": batch_size, **figures_of(timed, batch_size,
                                                                       args.output_len)}
        device = device_step(engine, batch_size)
        if device is not None:
            batches[batch_size]["device_step_ms"] = device
    engine.shutdown()
    return batches, target, target.startup(first_token)


def figures_of(runs: list[Run], batch_size: int, output_len: int) -> dict:
    e2e = [r.e2e for r in runs]
    decode = [d for r in runs for d in r.decode_steps]
    step = statistics.median(decode) if decode else None
    waits = step_profile([rec for r in runs for rec in r.records]).get("decode_only")
    return {"e2e_ms": summarize(ms(e2e)),
            "prefill_ms": summarize(ms([r.prefill for r in runs])),
            "decode_step_ms": step * 1e3 if step else None,
            "decode_tok_s": batch_size / step if step else None,
            "output_tok_s": batch_size * output_len / statistics.median(e2e),
            "decode_device_wait_share": waits["device_wait_share"] if waits else None}


def device_step(engine, batch_size: int, steps: int = 50) -> dict | None:
    """The device's own time per decode step, with no host work between steps: the batch's
    decode graph replayed back to back ("graph"), and with the logits and argmax after each
    replay as a greedy step launches them ("graph_logits_argmax"). Against decode_step_ms it
    shows how much of a step the host adds. None without CUDA graphs in this process."""
    runner = getattr(engine.core.executor, "runner", None)
    graphs = getattr(runner, "graphs", None)
    if graphs is None or runner.device.type != "cuda" or batch_size > graphs.max_size:
        return None
    size = next(s for s in graphs.sizes if s >= batch_size)
    graph, out, _ = graphs.graphs[size]
    graphs.slot_mapping.fill_(-1)        # the replays write no KV (the blocks are free now)

    def with_logits():
        graph.replay()
        argmax(runner.model.compute_logits(out[:batch_size]))

    figures = {}
    with torch.inference_mode():
        for name, fn in (("graph", graph.replay), ("graph_logits_argmax", with_logits)):
            fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            figures[name] = start.elapsed_time(end) / steps
    return figures


def roofline(weight_bytes: int, bandwidth: float, measured: dict) -> dict:
    """Batch 1 decode reads every weight once per step: at best weight_bytes / bandwidth."""
    step = weight_bytes / bandwidth
    return {"weight_bytes": weight_bytes, "copy_bandwidth_gb_s": bandwidth / 1e9,
            "step_ms": step * 1e3, "tok_s": 1 / step,
            "share": ratio(measured["decode_tok_s"], 1 / step)}


def run_hf(config: EngineConfig, args: argparse.Namespace, target: Target, batches: dict) -> None:
    """Add "hf" (every batch size) and "hf_static_compiled" (batch 1) figures to ``batches``;
    the static run goes last, since compiling changes the model."""
    from loom.bench import hf_compare

    model = hf_compare.load_model(config, target)
    variants = [("hf", b, {}) for b in args.batch_size]
    if 1 in batches and args.hf_static:
        variants.append(("hf_static_compiled", 1, hf_compare.static_compiled()))
    for name, batch_size, kwargs in variants:
        batches[batch_size][name] = hf_compare.guarded(name, lambda: hf_figures(
            model, config, args, target, batches[batch_size], kwargs))
    torch._dynamo.reset()


def hf_figures(model, config: EngineConfig, args: argparse.Namespace, target: Target,
               loom: dict, generate_kwargs: dict) -> dict:
    from loom.bench import hf_compare

    batch_size, runs = loom["batch_size"], []
    for i in range(args.hf_num_iters_warmup + args.hf_num_iters):
        # The prompts loom timed (its warm-up iterations come first).
        prompts = prompts_for(config.seed, batch_size, args.num_iters_warmup + i % args.num_iters,
                              args.input_len, target.vocab_size)
        runs.append(hf_compare.generate(model, prompts, args.output_len, target,
                                        **generate_kwargs)[0])
    figures = figures_of(runs[args.hf_num_iters_warmup:], batch_size, args.output_len)
    figures["loom_ratio"] = {key: ratio(loom[key], figures[key])
                             for key in ("output_tok_s", "decode_tok_s")}
    return figures


def table(batches: list[dict]) -> str:
    header = ["engine", "batch", "e2e ms", "prefill ms", "decode ms/step", "decode tok/s",
              "output tok/s", "loom/x output", "loom/x decode"]
    rows = []
    for b in batches:
        rows.append(["loom", b["batch_size"], _median(b["e2e_ms"]), _median(b["prefill_ms"]),
                     b["decode_step_ms"], b["decode_tok_s"], b["output_tok_s"], None, None])
        if "roofline" in b:
            r = b["roofline"]
            rows.append(["roofline", 1, None, None, r["step_ms"], r["tok_s"], None, None,
                         r["share"]])
        for name in ("hf", "hf_static_compiled"):
            if name in b:
                rows.append(_hf_row(name, b))
    return format_table(header, rows)


def _hf_row(name: str, b: dict) -> list:
    hf = b[name]
    if "error" in hf:
        return [name, b["batch_size"], hf["error"][:40]] + [None] * 6
    return [name, b["batch_size"], _median(hf["e2e_ms"]), _median(hf["prefill_ms"]),
            hf["decode_step_ms"], hf["decode_tok_s"], hf["output_tok_s"],
            hf["loom_ratio"]["output_tok_s"], hf["loom_ratio"]["decode_tok_s"]]


def _median(summary: dict | None) -> float | None:
    return summary["median"] if summary else None
