"""The server's lifetime: an engine crash fails the requests in flight with 500 and turns
/health to 503 without hanging; a drain lets requests in flight finish and refuses new ones, up
to the shutdown timeout; `loom serve` does it on SIGTERM."""
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

from live_server import MODEL_NAME, LiveServer, one_torch_thread, slowed

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
CONFIG = dict(max_model_len=256, max_num_seqs=8)
LONG = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 200,
        "temperature": 0, "ignore_eos": True}


def long(max_tokens: int = 200) -> dict:
    """LONG as openai client arguments."""
    return dict(model=MODEL_NAME, prompt=LONG["prompt"], max_tokens=max_tokens, temperature=0,
                extra_body={"ignore_eos": True})


def test_engine_crash_fails_in_flight_and_health(tiny_models):
    server = LiveServer(tiny_models["llama"], **CONFIG)
    try:
        client = server.client(timeout=20)
        step, calls = server.engine.step, []

        def failing_step():
            calls.append(1)
            if len(calls) >= 10:
                raise RuntimeError("injected device fault")
            return step()

        results = {}

        def call(name, fn):
            try:
                results[name] = fn()
            except Exception as e:  # noqa: BLE001
                results[name] = e

        stream = client.completions.create(stream=True, **long())
        first = next(iter(stream))
        assert first.choices
        server.engine.step = failing_step
        workers = [threading.Thread(target=call, args=(name, fn)) for name, fn in (
            ("whole", lambda: client.completions.create(**long())),
            ("chat", lambda: client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                max_tokens=200, extra_body={"ignore_eos": True})),
            ("stream", lambda: list(stream)))]
        start = time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            w.join(20)
        assert time.monotonic() - start < 15, "requests hung after the engine failed"
        assert isinstance(results["whole"], openai.InternalServerError)
        assert isinstance(results["chat"], openai.InternalServerError)
        assert "injected device fault" in results["whole"].message
        assert isinstance(results["stream"], openai.APIError)     # the error event in the stream
        with server.http() as http:
            assert http.get("/health").status_code == 503
            after = http.post("/v1/completions", json=LONG, timeout=5)
            assert after.status_code == 500
            assert set(after.json()["error"]) == {"message", "type", "param", "code"}
            assert http.get("/version").status_code == 200       # the HTTP side still answers
    finally:
        server.stop()


def test_drain_finishes_in_flight_and_refuses_new(tiny_models):
    server = LiveServer(tiny_models["llama"], shutdown_timeout=30, **CONFIG)
    server.engine.step = slowed(server.engine.step, 0.02)    # 60 tokens: over a second
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
    kv = server.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks


def test_drain_timeout_cancels_and_frees(tiny_models):
    server = LiveServer(tiny_models["llama"], shutdown_timeout=0.5, **CONFIG)
    server.engine.step = slowed(server.engine.step, 0.02)    # 240 tokens: about 5 s
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
    kv = server.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks and not server.engine.scheduler.requests


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
