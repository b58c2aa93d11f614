"""A live `loom serve` app on 127.0.0.1 in a background thread, for the server tests.

Its engine core runs in a process of its own (as `loom serve` does by default) or, with
engine_core="thread", in a thread. Either way the core is instrumented (``instrument``): tests
slow its steps down or make it fail through ``call_core``, and read its KV blocks there.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import httpx
import openai
import torch
import uvicorn

from loom.async_engine import AsyncEngine
from loom.config import build_config
from loom.engine_core import CoreStats, EngineCore
from loom.server.app import DrainingServer, build_app
from loom.server.serving import ServerSettings

MODEL_NAME = "tiny"


def instrument(core: EngineCore) -> None:
    """Run on the EngineCore before it serves (in its process): one torch thread, and three
    methods for call_core: set_step_delay(seconds), fail_after_steps(n) and rank_pids() (the
    process ids of the tensor-parallel ranks the core spawned)."""
    torch.set_num_threads(1)
    step = core.step
    state = {"delay": 0.0, "steps_left": None}

    def instrumented_step():
        if state["steps_left"] is not None:
            state["steps_left"] -= 1
            if state["steps_left"] < 0:
                raise RuntimeError("injected device fault")
        time.sleep(state["delay"])
        return step()

    core.step = instrumented_step
    core.set_step_delay = lambda seconds: state.update(delay=seconds)
    core.fail_after_steps = lambda n: state.update(steps_left=n)
    core.rank_pids = lambda: [p.pid for p in core.executor.world.processes]


def fail_at_start(core: EngineCore) -> None:
    raise RuntimeError("injected start-up fault")


def exit_at_start(core: EngineCore) -> None:
    os._exit(3)                     # the core's process ends without a word


class LiveServer:
    def __init__(self, model_path, api_key: str | None = None, shutdown_timeout: float = 5.0,
                 engine_core: str = "process", **config):
        config = build_config({"model": str(model_path), "dtype": "float32"} | config)
        self.async_engine = AsyncEngine(config, engine_core=engine_core, setup=instrument)
        self.api_key = api_key
        self.app = build_app(self.async_engine, ServerSettings(
            [MODEL_NAME, "tiny-alias"], str(model_path), api_key=api_key))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = DrainingServer(uvicorn.Config(
            self.app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                             **({"max_retries": 0, "timeout": 60} | kw))

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                                  **({"max_retries": 0, "timeout": 120} | kw))

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def call_core(self, method: str, *args, timeout: float = 30.0):
        """``EngineCore.<method>(*args)`` in the core, from this (the test's) thread."""
        call = self.async_engine.call_core(method, *args)
        return asyncio.run_coroutine_threadsafe(call, self.async_engine._loop).result(timeout)

    def core_stats(self) -> CoreStats:
        return self.call_core("stats")

    def set_step_delay(self, seconds: float) -> None:
        """Each engine step takes at least ``seconds``: requests that outlive a test's actions."""
        self.call_core("set_step_delay", seconds)

    def wait_idle(self, timeout: float = 10.0) -> float:
        """Seconds until the engine has no request left (fails after ``timeout``)."""
        start = time.monotonic()
        while self.core_stats().num_requests or self.async_engine.num_in_flight:
            assert time.monotonic() - start < timeout, "requests still in the engine"
            time.sleep(0.01)
        return time.monotonic() - start

    def assert_clean(self) -> None:
        """Nothing running or waiting, every KV block free, nothing left in flight."""
        self.wait_idle()
        stats = self.core_stats()
        assert stats.num_free_blocks == stats.num_blocks
        assert stats.num_requests == 0 and not self.async_engine.outputs.groups

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def one_torch_thread():
    """CPU tests share two cores with other processes: one intra-op thread is far faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
