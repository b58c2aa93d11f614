"""`loom bench throughput`: every prompt submitted at once (offline), run to completion.

Prints what vLLM's benchmarks print: elapsed time, requests/s, output and total tokens/s, and
TTFT / TPOT (time per output token after the first) from each request's metrics.
"""
from __future__ import annotations

import argparse

import numpy as np

from loom.bench.common import (Run, Target, add_result_args, format_table, greedy, ms,
                               random_prompts, ratio, require_positive, run_requests, start_engine,
                               startup_line, step_profile, summarize, write_record)
from loom.config import EngineConfig

NAME = "throughput"
HELP = "offline throughput: all prompts at once, requests/s, tokens/s, TTFT, TPOT"
WARMUP_PROMPTS, WARMUP_TOKENS = 4, 8     # a short first run, left out of the figures


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="generate exactly --output-len tokens per prompt")
    parser.add_argument("--hf-batch-size", type=int, default=64,
                        help="prompts per transformers generate call (--compare hf)")
    add_result_args(parser)


def main(config: EngineConfig, args: argparse.Namespace) -> int:
    require_positive(args, "num_prompts", "input_len", "output_len", "hf_batch_size")
    prompts, run, target, startup = run_loom(config, args)
    target.free()
    figures = {"num_prompts": args.num_prompts, "input_len": args.input_len,
               "output_len": args.output_len, "ignore_eos": args.ignore_eos,
               **figures_of(run), "startup": startup, "steps": step_profile(run.records)}
    if args.compare == "hf":
        from loom.bench import hf_compare

        figures["hf"] = hf_compare.guarded("generate", lambda: run_hf(
            config, args, target, prompts, figures))
        target.free()
    write_record(NAME, config, args, target, figures)
    print(startup_line(figures["startup"]))
    for kind, p in figures["steps"].items():
        print(f"{kind}: {p['steps']} steps, {p['total_s']:.1f} s, {p['mean_step_ms']:.2f} ms/step, "
              f"{p['mean_seqs']:.0f} seqs, {p['mean_tokens']:.0f} tokens, "
              f"host waited for the device {p['device_wait_share']:.0%} of the time")
    print(table(figures))
    return 0


def run_loom(config: EngineConfig, args: argparse.Namespace):
    engine, target = start_engine(config)
    rng = np.random.default_rng(config.seed)
    prompts = random_prompts(rng, args.num_prompts, args.input_len, target.vocab_size)
    warmup = run_requests(engine, random_prompts(rng, WARMUP_PROMPTS, args.input_len,
                                                 target.vocab_size),
                          greedy(min(args.output_len, WARMUP_TOKENS)))
    run = run_requests(engine, prompts, greedy(args.output_len, args.ignore_eos))
    engine.shutdown()
    return prompts, run, target, target.startup(warmup.stamps[warmup.first_token_step])


def figures_of(run: Run) -> dict:
    ttft, tpot, e2e = [], [], []
    prompt_tokens = output_tokens = 0
    for out in run.outputs:
        m, n = out.metrics, run.num_output_tokens[out.request_id]
        prompt_tokens += len(out.prompt_token_ids)
        output_tokens += n
        ttft.append(m["first_token_time"] - m["arrival_time"])
        e2e.append(m["last_token_time"] - m["arrival_time"])
        if n > 1:
            tpot.append((m["last_token_time"] - m["first_token_time"]) / (n - 1))
    return {"elapsed_s": run.e2e, "requests_per_s": len(run.outputs) / run.e2e,
            "output_tok_s": output_tokens / run.e2e,
            "total_tok_s": (prompt_tokens + output_tokens) / run.e2e,
            "num_prompt_tokens": prompt_tokens, "num_output_tokens": output_tokens,
            "ttft_ms": summarize(ms(ttft)), "tpot_ms": summarize(ms(tpot)),
            "e2e_ms": summarize(ms(e2e))}


def run_hf(config: EngineConfig, args: argparse.Namespace, target: Target,
           prompts: list[list[int]], loom: dict) -> dict:
    """The prompts in left-padded batches of --hf-batch-size, after a short warm-up call."""
    from loom.bench import hf_compare

    model = hf_compare.load_model(config, target)
    hf_compare.generate(model, prompts[:1], min(args.output_len, WARMUP_TOKENS), target)
    elapsed = output_tokens = 0
    for i in range(0, len(prompts), args.hf_batch_size):
        run, generated = hf_compare.generate(model, prompts[i:i + args.hf_batch_size],
                                             args.output_len, target)
        elapsed += run.e2e
        output_tokens += generated
    prompt_tokens = sum(len(p) for p in prompts)
    figures = {"batch_size": args.hf_batch_size, "elapsed_s": elapsed,
               "requests_per_s": len(prompts) / elapsed, "output_tok_s": output_tokens / elapsed,
               "total_tok_s": (prompt_tokens + output_tokens) / elapsed,
               "num_output_tokens": output_tokens}
    figures["loom_ratio"] = {key: ratio(loom[key], figures[key])
                             for key in ("requests_per_s", "output_tok_s", "total_tok_s")}
    return figures


def table(f: dict) -> str:
    header = ["engine", "requests", "elapsed s", "req/s", "output tok/s", "total tok/s",
              "TTFT ms mean/med/p99", "TPOT ms mean/med/p99", "loom/x output"]
    rows = [["loom", f["num_prompts"], f["elapsed_s"], f["requests_per_s"], f["output_tok_s"],
             f["total_tok_s"], _triple(f["ttft_ms"]), _triple(f["tpot_ms"]), None]]
    hf = f.get("hf")
    if hf is not None and "error" in hf:
        rows.append(["hf", f["num_prompts"], hf["error"][:40]] + [None] * 6)
    elif hf is not None:
        rows.append([f"hf (batch {hf['batch_size']})", f["num_prompts"], hf["elapsed_s"],
                     hf["requests_per_s"], hf["output_tok_s"], hf["total_tok_s"], None, None,
                     hf["loom_ratio"]["output_tok_s"]])
    return format_table(header, rows)


def _triple(s: dict | None) -> str | None:
    return None if s is None else f"{s['mean']:.2f} / {s['median']:.2f} / {s['p99']:.2f}"
