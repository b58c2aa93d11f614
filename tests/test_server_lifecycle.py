"""The server's lifetime: an engine crash (in the core, or its process killed) fails the
requests in flight with 500 and turns /health to 503 without hanging; a core that cannot start
says why; a drain lets requests in flight finish and refuses new ones, up to the shutdown
timeout; `loom serve` does it on SIGTERM. The engine core runs in its own process unless a test
says thread."""
from __future__ import annotations

import pytest

pytest.importorskip("openai", reason="the server tests use the openai client")
pytest.importorskip("fastapi", reason="the server needs fastapi (pip install loom[server])")

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai

import live_server
from live_server import MODEL_NAME, LiveServer, one_torch_thread
from loom.async_engine import AsyncEngine
from loom.cli import main
from loom.config import build_config
from loom.core_loop import EngineStartupError

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
CONFIG = dict(max_model_len=256, max_num_seqs=8)
LONG = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 200,
        "temperature": 0, "ignore_eos": True}


def long(max_tokens: int = 200) -> dict:
    """LONG as openai client arguments."""
    return dict(model=MODEL_NAME, prompt=LONG["prompt"], max_tokens=max_tokens, temperature=0,
                extra_body={"ignore_eos": True})


def run_all(calls: dict) -> tuple[dict, float]:
    """Each call in a thread of its own: {name: result or exception}, and the seconds taken."""
    results = {}

    def run(name, fn):
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001
            results[name] = e

    workers = [threading.Thread(target=run, args=item) for item in calls.items()]
    start = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    return results, time.monotonic() - start


def assert_failed_server(server) -> None:
    """/health 503, a new request 500 at once in OpenAI's shape, the HTTP side answering."""
    with server.http() as http:
        assert http.get("/health").status_code == 503
        after = http.post("/v1/completions", json=LONG, timeout=5)
        assert after.status_code == 500
        assert set(after.json()["error"]) == {"message", "type", "param", "code"}
        assert http.get("/version").status_code == 200


@pytest.mark.parametrize("engine_core", ["process", "thread"])
def test_engine_crash_fails_in_flight_and_health(tiny_models, engine_core):
    server = LiveServer(tiny_models["llama"], engine_core=engine_core, **CONFIG)
    try:
        client = server.client(timeout=20)
        stream = client.completions.create(stream=True, **long())
        first = next(iter(stream))
        assert first.choices
        server.call_core("fail_after_steps", 9)
        results, seconds = run_all({
            "whole": lambda: client.completions.create(**long()),
            "chat": lambda: client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                max_tokens=200, extra_body={"ignore_eos": True}),
            "stream": lambda: list(stream)})
        assert seconds < 15, "requests hung after the engine failed"
        assert isinstance(results["whole"], openai.InternalServerError)
        assert isinstance(results["chat"], openai.InternalServerError)
        assert "injected device fault" in results["whole"].message
        assert isinstance(results["stream"], openai.APIError)     # the error event in the stream
        assert_failed_server(server)
    finally:
        server.stop()


def test_core_process_killed_fails_in_flight_and_health(tiny_models):
    """SIGKILL to the engine core's process: the requests in flight fail with 500 within a
    bounded time, /health turns 503, new requests get 500 at once."""
    server = LiveServer(tiny_models["llama"], **CONFIG)
    try:
        server.set_step_delay(0.01)                          # 200 tokens: 2 s or more
        client = server.client(timeout=20)
        stream = client.completions.create(stream=True, **long())
        assert next(iter(stream)).choices

        def kill_when_both_run():
            deadline = time.monotonic() + 10
            while server.async_engine.num_in_flight < 2:    # the stream and "whole"
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(server.async_engine.client.process.pid, signal.SIGKILL)
            return time.monotonic()

        results, _ = run_all({"whole": lambda: client.completions.create(**long()),
                              "stream": lambda: list(stream), "kill": kill_when_both_run})
        assert isinstance(results["whole"], openai.InternalServerError), results["whole"]
        failed_at = time.monotonic()
        assert "killed by SIGKILL" in results["whole"].message
        assert isinstance(results["stream"], openai.APIError)     # the error event in the stream
        seconds = failed_at - results["kill"]
        print(f"\nkilled core: the requests in flight failed within {seconds:.2f} s")
        assert seconds < 5, "requests hung after the core process died"
        assert not server.async_engine.healthy
        assert_failed_server(server)
    finally:
        server.stop()


def test_core_start_up_failures_are_reported(tiny_models, tmp_path, capsys):
    """A core that fails to start, or whose process ends while starting, is an error that says
    so at once; `loom serve` with a missing model prints the core's config error."""
    config = build_config({"model": str(tiny_models["llama"]), "dtype": "float32"})
    start = time.monotonic()
    with pytest.raises(EngineStartupError, match="failed to start: RuntimeError: injected "
                                                 "start-up fault"):
        AsyncEngine(config, setup=live_server.fail_at_start)
    with pytest.raises(EngineStartupError, match="process exited with code 3 while starting"):
        AsyncEngine(config, setup=live_server.exit_at_start)
    assert main(["serve", str(tmp_path / "missing"), "--port", "1"]) == 2
    error = capsys.readouterr().err
    assert "loom: error: config key 'model'" in error and "is not a model directory" in error
    assert time.monotonic() - start < 60


def test_drain_finishes_in_flight_and_refuses_new(tiny_models):
    server = LiveServer(tiny_models["llama"], shutdown_timeout=30, **CONFIG)
    server.set_step_delay(0.02)                              # 60 tokens: over a second
    client = server.client()
    stream = client.completions.create(stream=True, **long(60))
    chunks = [next(iter(stream))]
    server.server.handle_exit(signal.SIGTERM, None)          # what SIGTERM does
    time.sleep(0.3)
    assert server.thread.is_alive()                          # draining
    with pytest.raises(openai.APIConnectionError):           # the socket is closed
        server.client().models.list()
    chunks += list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(len(c.choices[0].text) for c in chunks) > 0
    server.thread.join(10)
    assert not server.thread.is_alive()
    assert not server.async_engine.healthy                 # shut down with the server
    assert_stopped_clean(server)


def test_drain_timeout_cancels_and_frees(tiny_models):
    server = LiveServer(tiny_models["llama"], shutdown_timeout=0.5, **CONFIG)
    server.set_step_delay(0.02)                              # 240 tokens: about 5 s
    client = server.client()
    stream = client.completions.create(stream=True, **long(240))
    next(iter(stream))
    start = time.monotonic()
    server.server.handle_exit(signal.SIGTERM, None)
    server.thread.join(10)
    assert time.monotonic() - start < 5 and not server.thread.is_alive()
    reasons = []
    try:
        for chunk in stream:
            reasons += [c.finish_reason for c in chunk.choices]
    except (httpx.HTTPError, openai.APIError):
        pass                                                # cut off mid-stream
    assert "length" not in reasons
    assert_stopped_clean(server)


def assert_stopped_clean(server) -> None:
    """The core stopped when told to, and then held no request and no KV block."""
    stats = server.async_engine.final_stats
    assert stats is not None and stats.num_requests == 0
    assert stats.num_free_blocks == stats.num_blocks
    assert server.async_engine.client.process.exitcode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loom_serve_sigterm(tiny_models, tmp_path):
    """The real command: `loom serve MODEL`, an API key from LOOM_API_KEY, SIGTERM drains."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    env = os.environ | {"LOOM_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom.cli", "serve", str(tiny_models["llama"]), "--port",
         str(port), "--dtype", "float32", "--max-model-len", "256", "--served-model-name",
         MODEL_NAME, "--shutdown-timeout", "30"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "loom serve did not come up"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models").status_code == 401
        with httpx.stream("POST", url + "/v1/completions", headers=headers, timeout=60,
                          json=LONG | {"max_tokens": 80, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):
                httpx.get(url + "/health", timeout=2)
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == -signal.SIGTERM     # uvicorn re-raises it after the drain
        log_text = (tmp_path / "serve.log").read_text()
        assert "Application shutdown complete" in log_text and "Traceback" not in log_text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
