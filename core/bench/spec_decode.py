"""`loom bench latency --speculative ...`: speculative decoding against plain decoding.

One process: plain decoding first (the baseline, and the greedy continuations the oracle
proposes), then one engine per k of --spec-k, timed on the same prompts; for the oracle
method once per --spec-acceptance-rate, the engine kept. Reported per run: output tok/s, decode
tok/s (after the first token) and their ratio to plain decoding, the measured acceptance rate
(accepted / proposed draft tokens), the mean accepted length (tokens per verification) and the
share of steps launched ahead (async scheduling: before the previous step's tokens were known).

Workloads (--spec-prompts): ``random`` prompts, or ``self-repeat``: a random start followed by
the target's own greedy continuation of it, so the prompt ends on the model's trajectory and
its continuation goes on with it (where that trajectory repeats, n-gram lookup finds it).

The oracle proposes plain decoding's greedy continuation. In bf16 a verification step (k + 1
query tokens) may round a near-tie differently from a decode step and leave that path; so
each oracle engine first reruns the prompts at acceptance 1.0 with its own outputs as the
continuation until they agree (at most ORACLE_PASSES runs).
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np

from loom.bench.common import (Run, Target, format_table, greedy, random_prompts, ratio,
                               run_requests)
from loom.config import EngineConfig
from loom.engine import Engine
from loom.spec_decode.config import parse_speculative
from loom.spec_decode.oracle import OracleProposer

WORKLOADS = ("random", "self-repeat")
ORACLE_PASSES = 3


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding (with --speculative)")
    group.add_argument("--spec-k", type=int, nargs="+",
                       help="sweep num-speculative-tokens over these values (default: the "
                            "config's)")
    group.add_argument("--spec-acceptance-rate", type=float, nargs="+",
                       help="oracle: sweep acceptance-rate over these values (default: the "
                            "config's)")
    group.add_argument("--spec-prompts", choices=WORKLOADS, default="random",
                       help="random prompts, or a random start plus the target's greedy "
                            "continuation of it (self-repeat)")


def check_args(config: EngineConfig, args: argparse.Namespace) -> None:
    spec = parse_speculative(config.speculative)
    for k in args.spec_k or []:
        parse_speculative(dict(config.speculative, **{"num-speculative-tokens": k}))
    if args.spec_acceptance_rate:
        if spec.method != "oracle":
            raise ValueError("--spec-acceptance-rate: only for method oracle")
        for rate in args.spec_acceptance_rate:
            parse_speculative(dict(config.speculative, **{"acceptance-rate": rate}))


def run(config: EngineConfig, args: argparse.Namespace) -> tuple[dict, Target]:
    """Figures of the whole sweep, and where the target model ran."""
    check_args(config, args)
    spec = parse_speculative(config.speculative)
    plain_engine = Engine(config.replace(speculative=None))
    target = Target.of(plain_engine)
    prompts = {b: make_prompts(plain_engine, config.seed, b, args) for b in args.batch_size}
    plain, continuations = {}, {}
    for b in args.batch_size:
        runs = timed(plain_engine, prompts[b], args)
        plain[b] = figures_of(runs[args.num_iters_warmup:], b, args.output_len)
        continuations[b] = [r.token_ids for r in runs]
    plain_engine.shutdown()
    del plain_engine
    target.free()
    results = []
    for k in args.spec_k or [spec.num_speculative_tokens]:
        engine = Engine(config.replace(speculative=dict(
            config.speculative, **{"num-speculative-tokens": k})))
        rates = args.spec_acceptance_rate or [spec.acceptance_rate]
        paths = {b: continuations[b] for b in args.batch_size}
        if spec.method == "oracle":
            paths = {b: oracle_paths(engine, prompts[b], continuations[b], args)
                     for b in args.batch_size}
        for rate in (rates if spec.method == "oracle" else [None]):
            for b in args.batch_size:
                results.append(spec_figures(engine, k, rate, b, prompts[b], paths[b], plain[b],
                                            args))
        engine.shutdown()
        del engine
        target.free()
    return {"method": spec.method, "speculative": config.speculative,
            "workload": args.spec_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "num_iters": args.num_iters,
            "num_iters_warmup": args.num_iters_warmup,
            "plain": [{"batch_size": b, **plain[b]} for b in args.batch_size],
            "runs": results}, target


def make_prompts(engine: Engine, seed: int, batch_size: int, args) -> list[list[list[int]]]:
    """Per iteration (warm-up ones first), ``batch_size`` prompts of --input-len tokens."""
    vocab = engine.model_config.vocab_size
    out = []
    for i in range(args.num_iters_warmup + args.num_iters):
        rng = np.random.default_rng([seed, batch_size, i])
        if args.spec_prompts == "random":
            out.append(random_prompts(rng, batch_size, args.input_len, vocab))
            continue
        start = args.input_len // 2
        heads = random_prompts(rng, batch_size, start, vocab)
        run = run_requests(engine, heads, greedy(args.input_len - start))
        out.append([h + t for h, t in zip(heads, run.token_ids)])
    return out


def oracle_paths(engine: Engine, prompts, continuations, args) -> list[list[list[int]]]:
    """Greedy continuations this engine's verification steps reproduce (see the docstring)."""
    proposer = engine.proposer
    rate, proposer.acceptance_rate = proposer.acceptance_rate, 1.0
    for _ in range(ORACLE_PASSES):
        remember(proposer, prompts, continuations)
        outputs = [r.token_ids for r in timed(engine, prompts, args)]
        if outputs == continuations:
            break
        continuations = outputs
    proposer.acceptance_rate = rate
    return continuations


def remember(proposer: OracleProposer, prompts, continuations) -> None:
    for batch, outs in zip(prompts, continuations):
        for prompt, cont in zip(batch, outs):
            proposer.remember(prompt, cont)


def timed(engine: Engine, prompts: list[list[list[int]]], args) -> list[Run]:
    params = greedy(args.output_len)
    return [run_requests(engine, batch, params) for batch in prompts]


def figures_of(runs: list[Run], batch_size: int, output_len: int) -> dict:
    e2e = statistics.median(r.e2e for r in runs)
    decode = statistics.median(r.e2e - r.prefill for r in runs)
    return {"e2e_ms": e2e * 1e3, "output_tok_s": batch_size * output_len / e2e,
            "decode_tok_s": batch_size * (output_len - 1) / decode if decode > 0 else None,
            "steps": statistics.median(len(r.stamps) for r in runs),
            "steps_ahead": statistics.median(sum(s.ahead for s in r.records) / len(r.records)
                                             for r in runs)}


def spec_figures(engine: Engine, k: int, rate: float | None, batch_size: int, prompts,
                 continuations, plain: dict, args) -> dict:
    proposer = engine.proposer
    if isinstance(proposer, OracleProposer):
        proposer.acceptance_rate = rate
        remember(proposer, prompts, continuations)
        off_path = proposer.num_off_path
    before = engine.spec_decode_stats.copy()
    runs = timed(engine, prompts, args)
    timed_stats = engine.spec_decode_stats.since(before)   # warm-up iterations included
    figures = figures_of(runs[args.num_iters_warmup:], batch_size, args.output_len)
    out = {"num_speculative_tokens": k, "acceptance_rate_set": rate, "batch_size": batch_size,
           **figures,
           "speedup_output": ratio(figures["output_tok_s"], plain["output_tok_s"]),
           "speedup_decode": ratio(figures["decode_tok_s"], plain["decode_tok_s"]),
           "acceptance_rate": timed_stats.acceptance_rate,
           "mean_accepted_length": timed_stats.mean_accepted_length,
           "spec_decode": timed_stats.as_dict()}
    if isinstance(proposer, OracleProposer):
        out["oracle_off_path"] = proposer.num_off_path - off_path
    return out


def table(figures: dict) -> str:
    header = ["method", "k", "rate set", "batch", "e2e ms", "output tok/s", "decode tok/s",
              "x plain", "accepted", "mean len", "ahead"]
    rows = [["plain", None, None, p["batch_size"], p["e2e_ms"], p["output_tok_s"],
             p["decode_tok_s"], 1.0, None, None, p["steps_ahead"]] for p in figures["plain"]]
    for r in figures["runs"]:
        rows.append([figures["method"], r["num_speculative_tokens"], r["acceptance_rate_set"],
                     r["batch_size"], r["e2e_ms"], r["output_tok_s"], r["decode_tok_s"],
                     r["speedup_decode"], r["acceptance_rate"], r["mean_accepted_length"],
                     r["steps_ahead"]])
    return format_table(header, rows)
