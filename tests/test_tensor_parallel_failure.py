"""A tensor-parallel rank that dies takes the server to its error state, never to a hang: the
request in flight fails, /health turns 503, later requests fail at once naming the rank. The
engine core spawns its second rank itself here, as `loom serve --tensor-parallel-size 2` does,
with the core in a process of its own or in a thread of the server's."""
from __future__ import annotations

import pytest

pytest.importorskip("openai", reason="the server tests use the openai client")
pytest.importorskip("fastapi", reason="the server needs fastapi (pip install loom[server])")

import os
import signal
import time

import openai

from live_server import MODEL_NAME, LiveServer

LONG = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=200, temperature=0,
            extra_body={"ignore_eos": True})


@pytest.mark.parametrize("engine_core", ["process", "thread"])
def test_a_killed_rank_fails_the_request_and_health(tiny_models, engine_core):
    server = LiveServer(tiny_models["llama"], engine_core=engine_core, tensor_parallel_size=2,
                        max_model_len=256, max_num_seqs=4)
    try:
        server.set_step_delay(0.02)                                # 200 tokens: seconds
        client = server.client(timeout=30)
        stream = client.completions.create(stream=True, **LONG)
        assert next(iter(stream)).choices                          # both ranks are serving
        (rank1,) = server.call_core("rank_pids")
        os.kill(rank1, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(openai.APIError):
            list(stream)
        assert time.monotonic() - start < 10, "the request hung after a rank died"
        with server.http() as http:
            assert http.get("/health").status_code == 503
            after = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi",
                                                       "max_tokens": 4}, timeout=10)
            assert after.status_code == 500
            assert "tensor-parallel rank 1 killed by signal 9" in after.json()["error"]["message"]
    finally:
        start = time.monotonic()
        server.stop()
        assert time.monotonic() - start < 15, "shutting down hung on the dead rank"
