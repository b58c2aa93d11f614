"""Load on a live server (loopback, bounded): 200 concurrent streaming requests, a quarter of
them hanging up mid-stream at random points, over a KV pool small enough to force preemption.
Every request that finishes has exactly its greedy offline text; afterwards every KV block is
free, nothing runs and the server is healthy. Also `loom bench serve` against it."""
from __future__ import annotations

import pytest

pytest.importorskip("openai", reason="the server tests use the openai client")
pytest.importorskip("fastapi", reason="the server needs fastapi (pip install loom[server])")

import asyncio
import json
import random
import time


from live_server import MODEL_NAME, LiveServer, one_torch_thread
from loom import LLM, SamplingParams
from loom.cli import main

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

NUM_REQUESTS = 200
HANG_UPS = NUM_REQUESTS // 4
BASE = ["The quick brown fox", "Once upon a time there was a little town by the sea",
        "What is the capital of France?", "Paged attention stores the keys and values",
        "The children ran along the beach"]
PROMPTS = [f"{b}{suffix}" for b in BASE for suffix in ("", ".", " and", " again")]   # 20
MAX_TOKENS = (8, 16, 24)
# 48 blocks of 4 tokens: about 7 of the 32 sequences the scheduler may run fit at once.
CONFIG = dict(block_size=4, num_gpu_blocks_override=48, max_model_len=96, max_num_seqs=32)


@pytest.fixture(scope="module")
def server(tiny_models):
    s = LiveServer(tiny_models["llama"], **CONFIG)
    yield s
    s.stop()


def offline_texts(path) -> dict:
    llm = LLM(str(path), dtype="float32", max_model_len=96, max_num_seqs=64)
    combos = [(p, m) for p in PROMPTS for m in MAX_TOKENS]
    outs = llm.generate([p for p, _ in combos],
                        [SamplingParams(temperature=0, max_tokens=m) for _, m in combos],
                        use_tqdm=False)
    return {combo: out.outputs[0].text for combo, out in zip(combos, outs)}


async def one_request(client, prompt: str, max_tokens: int, hang_up_after: int | None):
    stream = await client.completions.create(model=MODEL_NAME, prompt=prompt,
                                             max_tokens=max_tokens, temperature=0, stream=True)
    text, reason, chunks = "", None, 0
    async for chunk in stream:
        for c in chunk.choices:
            text += c.text
            reason = c.finish_reason or reason
        chunks += 1
        if hang_up_after is not None and chunks >= hang_up_after and reason is None:
            await stream.close()                     # the client goes away mid-stream
            return "hung up", text, None
    return "completed", text, reason


async def run_load(server, plan) -> list:
    async with server.async_client() as client:
        return await asyncio.gather(*(one_request(client, *p) for p in plan))


def test_load_disconnects_preemption(server, tiny_models):
    expected = offline_texts(tiny_models["llama"])
    rng = random.Random(0)
    hang_ups = set(rng.sample(range(NUM_REQUESTS), HANG_UPS))
    plan = [(PROMPTS[i % len(PROMPTS)], MAX_TOKENS[i % len(MAX_TOKENS)],
             rng.randint(1, 6) if i in hang_ups else None) for i in range(NUM_REQUESTS)]
    server.set_step_delay(0.005)      # tokens come slower than clients hang up: aborts meet
    start = time.monotonic()          # requests the engine still holds
    results = asyncio.run(run_load(server, plan))
    elapsed = time.monotonic() - start
    server.set_step_delay(0.0)
    completed = [(p, r) for p, r in zip(plan, results) if r[0] == "completed"]
    for (prompt, max_tokens, _), (_, text, reason) in completed:
        assert text == expected[(prompt, max_tokens)], (prompt, max_tokens)
        assert reason in ("stop", "length")
    server.assert_clean()
    assert server.async_engine.healthy
    with server.http() as http:
        assert http.get("/health").status_code == 200
        metrics = http.get("/metrics").text
    aborted = sample(metrics, 'loom:request_success_total{finished_reason="abort"')
    stats = server.core_stats()
    preemptions = stats.scheduler.num_preemptions
    leaked = stats.num_blocks - stats.num_free_blocks
    print(f"\nload: {NUM_REQUESTS} streams in {elapsed:.1f} s: {len(completed)} completed, "
          f"{NUM_REQUESTS - len(completed)} hung up ({aborted:.0f} aborted in the engine), "
          f"{preemptions} preemptions, blocks leaked = {leaked}")
    assert len(completed) >= NUM_REQUESTS - HANG_UPS
    assert 1 <= aborted <= HANG_UPS
    assert preemptions > 0 and leaked == 0
    assert sample(metrics, "loom:num_preemptions_total") == preemptions
    assert sample(metrics, "loom:num_requests_running") == 0


def sample(metrics: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(prefix))


@pytest.mark.parametrize("pacing", [["--request-rate", "40"], ["--max-concurrency", "3"]])
def test_bench_serve(server, tmp_path, capsys, pacing):
    path = tmp_path / "serve.json"
    assert main(["bench", "serve", "--port", str(server.port), "--num-prompts", "12",
                 "--input-len", "8", "--output-len", "6", *pacing, "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["benchmark"] == "serve" and record["command"][:3] == ["loom", "bench", "serve"]
    f = record["figures"]
    assert f["completed"] == 12 and f["failed"] == 0
    assert f["num_output_tokens"] == 12 * 6 and f["num_prompt_tokens"] == 12 * 8
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(f[key]) == {"mean", "median", "p99"} and f[key]["median"] > 0
    assert f["output_tok_s"] > 0 and f["requests_per_s"] > 0
    out = capsys.readouterr().out
    assert "TTFT ms" in out and "ITL ms" in out
    server.assert_clean()
