"""Capacity of the `loom serve` front end, with an engine core that runs no model.

    python benchmarks/server_frontend.py [--requests 1024] [--concurrency 256]
        [--prompt-len 128] [--output-len 128] [--step-ms 0] [--engine-core process]
        [--logprobs N] [--profile OUT.prof] [--json OUT.json]

The real front end (uvicorn, the FastAPI app, AsyncEngine, the output processor) serves
/v1/completions streams over loopback. Its engine core is the real one (its own process,
scheduler and KV cache) with the model step replaced: each step "samples" a fixed
pseudo-random token per sequence at once, or after --step-ms. The load comes from another
process, a bare asyncio HTTP client that only splits the events, so the front end (one
process, one event loop) is what runs out first.

It prints the output tokens/s and SSE events/s the front end sustained, the CPU seconds its
process spent per output token (the engine core's and the client's are shown apart), the gaps
between a stream's reads as the client saw them (its inter-token latency) and how late the
event loop ran a timer due every 5 ms (its stalls). --profile writes a cProfile of the event
loop's thread (read with `python -m pstats`); py-spy works too (`py-spy record -- python ...`).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import multiprocessing
import os
import socket
import subprocess
import threading
import time
import zlib
from dataclasses import asdict, dataclass

MODEL_NAME = "frontend-bench"


# ---- the engine core's fake model (runs in the core's process) -------------------------------
class InstantStep:
    """The result of a step launched without a model: one token for each sequence whose
    prompt is done, ready ``step_s`` after the device (a clock) is free to start it."""

    def __init__(self, scheduler, sched, ready_at: float, vocab: int):
        from loom.scheduler_output import ModelRunnerOutput

        self.ready_at = ready_at
        self.output = ModelRunnerOutput()
        for rid in sched.num_scheduled_tokens:
            req = scheduler.requests[rid]
            if req.num_computed_tokens >= req.num_tokens:       # the prompt is all in
                position = req.num_tokens
                token = 4 + (zlib.crc32(rid.encode()) + position * 7919) % (vocab - 4)
                self.output.req_ids.append(rid)
                self.output.sampled_token_ids.append([token])
        self.output.logprobs = [None] * len(self.output.req_ids)

    def result(self):
        delay = self.ready_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return self.output


def fake_model(core) -> None:
    """EngineCore setup: steps take ``LOOM_BENCH_STEP_MS`` and run no model."""
    step_s = float(os.environ.get("LOOM_BENCH_STEP_MS", "0")) / 1e3
    vocab = core.model_config.vocab_size
    device_free_at = 0.0

    def execute_async(sched):
        nonlocal device_free_at           # steps run one after another, as on a device
        device_free_at = max(time.perf_counter(), device_free_at) + step_s
        return InstantStep(core.scheduler, sched, device_free_at, vocab)

    core.executor.execute_async = execute_async


# ---- the load (runs in a process of its own) --------------------------------------------------
@dataclass
class ClientFigures:
    completed: int = 0
    failed: int = 0
    events: int = 0             # SSE events with choices, over all streams
    output_tokens: int = 0      # from the usage chunks
    elapsed_s: float = 0.0
    ttft_s_mean: float = 0.0
    gap_ms_p50: float = 0.0     # between a stream's reads that brought data: its ITL
    gap_ms_p99: float = 0.0
    gap_ms_max: float = 0.0
    cpu_s: float = 0.0


def request_bytes(port: int, prompt: list[int], args) -> bytes:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": args.output_len,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.logprobs is not None:
        body["logprobs"] = args.logprobs
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + data


def dechunk(body: bytes) -> bytes:
    """A chunked transfer-encoded body, decoded."""
    out, pos = [], 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2:end + 2 + size])
        pos = end + 2 + size + 2


async def one_stream(port: int, request: bytes, gaps: list[float]) -> tuple[int, int, float]:
    """(events with choices, completion tokens, seconds to the first event) of one stream;
    the gaps between its reads after the first event go to ``gaps``."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    parts, first, last = [], None, 0.0
    while data := await reader.read(1 << 16):
        now = time.perf_counter()
        if first is None:
            if b"data: " in data:
                first = now - start
        else:
            gaps.append(now - last)
        last = now
        parts.append(data)
    writer.close()
    raw = b"".join(parts)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    events = [e for e in dechunk(body).split(b"\n\n") if e.startswith(b"data: {")]
    usage = json.loads(events[-1][6:])
    if "error" in usage:
        raise RuntimeError(str(usage["error"]))
    return len(events) - 1, usage["usage"]["completion_tokens"], first or 0.0


async def drive(port: int, args) -> ClientFigures:
    prompts = [[(7 + i * 31 + j * 13) % 400 + 4 for j in range(args.prompt_len)]
               for i in range(args.requests)]
    requests = [request_bytes(port, p, args) for p in prompts]
    limit = asyncio.Semaphore(args.concurrency)
    figures = ClientFigures()
    ttfts, gaps = [], []

    async def one(request: bytes) -> None:
        async with limit:
            try:
                events, tokens, ttft = await one_stream(port, request, gaps)
            except Exception as e:  # noqa: BLE001 - counted; the first few are shown
                figures.failed += 1
                if figures.failed <= 3:
                    print(f"request failed: {type(e).__name__}: {e}", flush=True)
                return
        figures.completed += 1
        figures.events += events
        figures.output_tokens += tokens
        ttfts.append(ttft)

    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    figures.elapsed_s = time.perf_counter() - start
    figures.cpu_s = time.process_time() - cpu
    figures.ttft_s_mean = sum(ttfts) / max(1, len(ttfts))
    gaps.sort()
    if gaps:
        figures.gap_ms_p50, figures.gap_ms_p99, figures.gap_ms_max = (
            1e3 * gaps[int(q * (len(gaps) - 1))] for q in (0.5, 0.99, 1.0))
    return figures


def client_main(port: int, args, results) -> None:
    results.put(asdict(asyncio.run(drive(port, args))))


# ---- the server (this process) ----------------------------------------------------------------
def build_server(args):
    import uvicorn

    from loom.async_engine import AsyncEngine
    from loom.config import build_config
    from loom.demo_model import ensure_demo_model
    from loom.server.app import DrainingServer, build_app
    from loom.server.serving import ServerSettings

    os.environ["LOOM_BENCH_STEP_MS"] = str(args.step_ms)
    blocks_per_seq = -(-(args.prompt_len + args.output_len) // 16) + 1
    max_num_seqs = args.max_num_seqs or args.concurrency
    config = build_config({"model": str(ensure_demo_model()), "dtype": "float32",
                           "block_size": 16, "max_num_seqs": max_num_seqs,
                           "max_model_len": args.prompt_len + args.output_len + 16,
                           "num_gpu_blocks_override": max_num_seqs * blocks_per_seq + 64,
                           "max_num_batched_tokens": max(8192, args.prompt_len)})
    engine = AsyncEngine(config, engine_core=args.engine_core, setup=fake_model)
    app = build_app(engine, ServerSettings([MODEL_NAME]))
    server = DrainingServer(uvicorn.Config(app, log_level="warning", http=args.http,
                                           loop=args.loop))
    return engine, server


def serve_in_thread(server, sock, profiler):
    def run():
        if profiler is not None:
            profiler.enable()
        try:
            server.run(sockets=[sock])
        finally:
            if profiler is not None:
                profiler.disable()

    thread = threading.Thread(target=run, name="frontend", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return thread


class LoopLag:
    """How late the event loop runs a callback due every ``PERIOD_S``: its stalls (a garbage
    collection, a long callback) as a reader of the streams would feel them."""
    PERIOD_S = 0.005

    def __init__(self, loop):
        self.loop = loop
        self.lags: list[float] = []
        self.running = True
        loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        if self.running:
            due = self.loop.time() + self.PERIOD_S
            self.loop.call_at(due, self._tick, due)

    def _tick(self, due: float) -> None:
        self.lags.append(self.loop.time() - due)
        self._schedule()

    def stop(self) -> dict:
        self.running = False
        lags = sorted(self.lags) or [0.0]
        return {f"loop_lag_ms_{name}": 1e3 * lags[int(q * (len(lags) - 1))]
                for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args) -> dict:
    engine, server = build_server(args)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    profiler = cProfile.Profile() if args.profile else None
    thread = serve_in_thread(server, sock, profiler)
    core_pid = engine.client.process.pid if args.engine_core == "process" else None
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    client = ctx.Process(target=client_main, args=(port, args, results))
    cpu = time.process_time()
    core_cpu = process_cpu_s(core_pid) if core_pid else 0.0
    lag = LoopLag(engine._loop)
    client.start()
    figures = results.get()
    frontend_cpu = time.process_time() - cpu
    core_cpu = process_cpu_s(core_pid) - core_cpu if core_pid else None
    lags = lag.stop()
    client.join()
    server.should_exit = True
    thread.join(60)
    if profiler is not None:
        profiler.dump_stats(args.profile)
    return summarize(args, figures, frontend_cpu, core_cpu) | lags


def summarize(args, client: dict, frontend_cpu: float, core_cpu: float | None) -> dict:
    elapsed, tokens, events = client["elapsed_s"], client["output_tokens"], client["events"]
    expected = args.requests * args.output_len
    figures = {
        "requests": args.requests, "concurrency": args.concurrency,
        "max_num_seqs": args.max_num_seqs or args.concurrency,
        "prompt_len": args.prompt_len, "output_len": args.output_len, "step_ms": args.step_ms,
        "engine_core": args.engine_core, "logprobs": args.logprobs, "http": args.http,
        "loop": args.loop,
        "completed": client["completed"], "failed": client["failed"],
        "output_tokens": tokens, "all_tokens_arrived": tokens == expected,
        "elapsed_s": elapsed, "output_tok_s": tokens / elapsed, "events_s": events / elapsed,
        "tokens_per_event": tokens / max(1, events), "ttft_s_mean": client["ttft_s_mean"],
        "gap_ms_p50": client["gap_ms_p50"], "gap_ms_p99": client["gap_ms_p99"],
        "gap_ms_max": client["gap_ms_max"],
        "frontend_cpu_s": frontend_cpu, "frontend_cpu_us_per_token": 1e6 * frontend_cpu / tokens,
        "frontend_cpu_share": frontend_cpu / elapsed,
        "core_cpu_s": core_cpu, "client_cpu_s": client["cpu_s"],
    }
    if args.step_ms:
        # A front end that keeps up delivers a token per sequence per step.
        figures["ideal_output_tok_s"] = figures["max_num_seqs"] * 1e3 / args.step_ms
    return figures


def report(f: dict) -> str:
    lines = [f"{f['completed']} streams ({f['failed']} failed), {f['output_tokens']} tokens in "
             f"{f['elapsed_s']:.2f} s: {f['output_tok_s']:.0f} output tok/s, "
             f"{f['events_s']:.0f} SSE events/s ({f['tokens_per_event']:.2f} tokens/event), "
             f"TTFT mean {f['ttft_s_mean'] * 1e3:.0f} ms",
             f"gaps in a stream: p50 {f['gap_ms_p50']:.1f} ms, p99 {f['gap_ms_p99']:.1f} ms, "
             f"max {f['gap_ms_max']:.0f} ms; event loop late by p50 {f['loop_lag_ms_p50']:.1f} "
             f"ms, p99 {f['loop_lag_ms_p99']:.1f} ms, max {f['loop_lag_ms_max']:.0f} ms",
             f"front end: {f['frontend_cpu_s']:.2f} CPU s = "
             f"{f['frontend_cpu_us_per_token']:.1f} us/token, busy "
             f"{100 * f['frontend_cpu_share']:.0f}% of the wall time; client "
             f"{f['client_cpu_s']:.2f} CPU s"
             + (f", engine core {f['core_cpu_s']:.2f} CPU s" if f["core_cpu_s"] is not None
                else "")]
    if "ideal_output_tok_s" in f:
        lines.append(f"ideal at {f['step_ms']} ms/step: {f['ideal_output_tok_s']:.0f} tok/s "
                     f"(reached {100 * f['output_tok_s'] / f['ideal_output_tok_s']:.0f}%)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=256, help="streams open at once")
    p.add_argument("--max-num-seqs", type=int,
                   help="sequences the engine core runs at once (default: --concurrency)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt token ids per request")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="how long each engine step takes (0: no wait)")
    p.add_argument("--engine-core", choices=["process", "thread"], default="process")
    p.add_argument("--logprobs", type=int, help="ask for this many logprobs per token")
    p.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                   help="uvicorn's HTTP parser (auto: httptools where installed, as loom serve)")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="uvicorn's event loop (auto: uvloop where installed, as loom serve)")
    p.add_argument("--profile", metavar="PATH", help="cProfile the event loop's thread")
    p.add_argument("--json", metavar="PATH", help="write the figures here")
    args = p.parse_args()
    for name in ("requests", "concurrency", "prompt_len", "output_len"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}: must be > 0")
    figures = run(args)
    print(report(figures))
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        record = {"benchmark": "server_frontend", "commit": commit,
                  "device": f"host CPU, {os.cpu_count()} cores (no model)",
                  "command": "python benchmarks/server_frontend.py " + " ".join(
                      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                      if v is not None and k not in ("json", "profile")),
                  "figures": figures}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
