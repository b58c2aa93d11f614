"""`loom bench serve`: a client-side benchmark of a running `loom serve` (or any server with
OpenAI's /v1/completions).

Random prompts of exactly --input-len token ids go to /v1/completions as streams, arriving at
--request-rate (Poisson; inf: all at once) with at most --max-concurrency in flight, each
asking for --output-len tokens (ignore_eos). Prints what vLLM's `bench serve` prints: request
and token throughput, TTFT, TPOT (per output token after the first), ITL (the gaps between
streamed chunks) and end-to-end latency, mean / median / p99, and saves them as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loom.bench.common import (RESULTS_DIR, format_table, git_commit, ms, random_prompts,
                               summarize)

NAME = "serve"
HELP = "benchmark a running server: TTFT, TPOT, ITL, throughput under a request rate"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", help="the server (default http://HOST:PORT)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint", default="/v1/completions")
    parser.add_argument("--model", help="the served model name (default: the server's first)")
    parser.add_argument("--api-key", default=os.environ.get("LOOM_API_KEY"))
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests per second, Poisson arrivals (default inf: all at once)")
    parser.add_argument("--max-concurrency", type=int,
                        help="at most this many requests in flight (default: no limit)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="generate exactly --output-len tokens per prompt")
    parser.add_argument("--vocab-size", type=int,
                        help="draw prompt tokens below this (default: the served model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="per request, seconds")
    parser.add_argument("--json", metavar="PATH", help="write the results here as JSON")
    parser.add_argument("--save", action="store_true",
                        help=f"also write the JSON under {RESULTS_DIR}/")


@dataclass
class Result:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def main(args: argparse.Namespace) -> int:
    for flag in ("num_prompts", "input_len", "output_len", "request_rate"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')}: must be > 0")
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        raise ValueError("--max-concurrency: must be > 0")
    record = asyncio.run(run(args))
    for path in output_paths(args, record):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    print(table(record["figures"]))
    return 0 if record["figures"]["failed"] == 0 else 1


async def run(args: argparse.Namespace) -> dict:
    import httpx

    base_url = args.base_url or f"http://{args.host}:{args.port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or args.num_prompts
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout, connect=60.0)) as client:
        served = (await get_json(client, "/v1/models"))["data"][0]
        version = await get_json(client, "/version")
        model = args.model or served["id"]
        vocab = args.vocab_size or vocab_size_of(served.get("root"))
        rng = np.random.default_rng(args.seed)
        prompts = random_prompts(rng, args.num_prompts, args.input_len, vocab)
        await send(client, args, model, prompts[0][:8], 4)          # warm up, not counted
        start = time.perf_counter()
        results = await run_all(client, args, model, prompts, rng)
        elapsed = time.perf_counter() - start
    figures = {"num_prompts": args.num_prompts, "input_len": args.input_len,
               "output_len": args.output_len, "request_rate": args.request_rate,
               "max_concurrency": args.max_concurrency, **figures_of(results, elapsed)}
    return {"benchmark": NAME, "commit": git_commit(), "server": {
                "base_url": base_url, "model": model, "root": served.get("root"), **version},
            "command": args.argv if hasattr(args, "argv") else None, "figures": figures}


async def get_json(client, path: str) -> dict:
    response = await client.get(path)
    response.raise_for_status()
    return response.json()


def vocab_size_of(root: str | None) -> int:
    config = Path(root or "") / "config.json"
    if not config.is_file():
        raise ValueError("--vocab-size: needed, since the server's model directory "
                         f"({root!r}) is not readable here")
    return json.loads(config.read_text())["vocab_size"]


async def run_all(client, args, model: str, prompts: list[list[int]], rng) -> list[Result]:
    limit = (asyncio.Semaphore(args.max_concurrency) if args.max_concurrency
             else contextlib.nullcontext())

    async def one(prompt):
        async with limit:
            return await send(client, args, model, prompt, args.output_len)

    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(one(prompt)))
        if math.isfinite(args.request_rate):
            await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
    return list(await asyncio.gather(*tasks))


async def send(client, args, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": args.ignore_eos, "stream": True,
            "stream_options": {"include_usage": True}}
    result = Result(prompt_len=len(prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", args.endpoint, json=body) as response:
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:300]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:300]
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"[:300]
        return result
    result.latency = time.perf_counter() - start
    result.ok = True
    return result


def figures_of(results: list[Result], elapsed: float) -> dict:
    done = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_len for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {"completed": len(done), "failed": len(results) - len(done), "errors": errors[:5],
            "elapsed_s": elapsed, "requests_per_s": len(done) / elapsed,
            "output_tok_s": output / elapsed, "total_tok_s": (prompt + output) / elapsed,
            "num_prompt_tokens": prompt, "num_output_tokens": output,
            "ttft_ms": summarize(ms([r.ttft for r in done])), "tpot_ms": summarize(ms(tpot)),
            "itl_ms": summarize(ms([gap for r in done for gap in r.itl])),
            "e2e_ms": summarize(ms([r.latency for r in done]))}


def output_paths(args: argparse.Namespace, record: dict) -> list[Path]:
    paths = [Path(args.json)] if args.json else []
    if args.save:
        name = Path(record["server"]["model"]).name
        paths.append(RESULTS_DIR / f"serve-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    return paths


def table(f: dict) -> str:
    head = (f"completed {f['completed']}, failed {f['failed']} in {f['elapsed_s']:.2f} s: "
            f"{f['requests_per_s']:.2f} req/s, {f['output_tok_s']:.1f} output tok/s, "
            f"{f['total_tok_s']:.1f} total tok/s")
    rows = [[name, *(f[key][k] if f[key] else None for k in ("mean", "median", "p99"))]
            for name, key in (("TTFT ms", "ttft_ms"), ("TPOT ms", "tpot_ms"),
                              ("ITL ms", "itl_ms"), ("E2E ms", "e2e_ms"))]
    return head + "\n" + format_table(["", "mean", "median", "p99"], rows)
