"""A live `loom serve` app on 127.0.0.1 in a background thread, for the server tests."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import torch
import uvicorn

from loom.async_engine import AsyncEngine
from loom.config import build_config
from loom.engine import Engine
from loom.server.app import DrainingServer, build_app
from loom.server.serving import ServerSettings

MODEL_NAME = "tiny"


class LiveServer:
    def __init__(self, model_path, api_key: str | None = None, shutdown_timeout: float = 5.0,
                 **config):
        config = build_config({"model": str(model_path), "dtype": "float32"} | config)
        self.engine = Engine(config)
        self.async_engine = AsyncEngine(self.engine)
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

    def wait_idle(self, timeout: float = 10.0) -> float:
        """Seconds until the engine has no request left (fails after ``timeout``)."""
        start = time.monotonic()
        while self.engine.has_unfinished_requests() or self.async_engine.num_in_flight:
            assert time.monotonic() - start < timeout, "requests still in the engine"
            time.sleep(0.01)
        return time.monotonic() - start

    def assert_clean(self) -> None:
        """Nothing running or waiting, every KV block free, nothing left in flight."""
        self.wait_idle()
        kv = self.engine.kv_cache
        assert kv.num_free_blocks == kv.num_blocks
        assert not self.engine.scheduler.requests and not self.engine.outputs.groups

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def slowed(step, seconds: float):
    """An engine step that takes at least ``seconds``: requests that outlive a test's actions."""
    def slow_step():
        time.sleep(seconds)
        return step()
    return slow_step


def one_torch_thread():
    """CPU tests share two cores with other processes: one intra-op thread is far faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
