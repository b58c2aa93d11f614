"""The front end's end of the engine core: a process of its own (ProcessClient, the default of
`loom serve`) or a thread of the server's process (ThreadClient, --engine-core thread).

Both take the same messages (core_loop) and hand the core's messages to one callback on the
event loop: StepOutputs, UtilityResult, Stopped, and CoreFailed when the core fails, or when its
process ends without having been told to. The callback gets every message waiting at once, in
order: a front end that fell behind the core catches up on several steps in one go.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import pickle
import queue
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable

import zmq
import zmq.asyncio

from loom import core_process
from loom.config import ConfigError, EngineConfig
from loom.core_loop import (CoreFailed, EngineStartupError, Ready, Shutdown, StartupFailed,
                            Stopped, describe, serve)
from loom.engine_core import CoreInfo, EngineCore

logger = logging.getLogger("loom")

Setup = Callable[[EngineCore], None]
OnMessages = Callable[[list], None]
POLL_MS = 200               # while no output comes, how often the core process is looked at
MAX_BATCH = 64              # messages handed over at most in one call
KILL_WAIT_S = 5.0


class ThreadClient:
    """The core steps in a thread; messages pass through a queue each way, and the event loop
    is woken (``call_soon_threadsafe``) once for all the messages that wait. It shares the GIL
    with the event loop."""

    def __init__(self, config: EngineConfig, setup: Setup | None = None):
        self.core = EngineCore(config)
        if setup is not None:
            setup(self.core)
        self.info: CoreInfo = self.core.info()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_pending = False              # a delivery is scheduled on the event loop
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_messages: OnMessages) -> None:
        self._loop, self._on_messages = loop, on_messages
        self._thread = threading.Thread(target=self._run, name="loom-engine-core", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def send(self, message) -> None:
        self._inbox.put(message)

    def shutdown(self, timeout: float) -> None:
        self._inbox.put(Shutdown())
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self.core.shutdown()

    def _run(self) -> None:
        try:
            serve(self.core, self._receive, self._reply)
        except Exception as e:  # noqa: BLE001 - any failure ends the core, loudly
            logger.exception("loom: the engine core failed")
            self._reply(CoreFailed(describe(e)))
        finally:
            self.core.shutdown()

    def _receive(self, block: bool):
        try:
            return self._inbox.get(block)
        except queue.Empty:
            return None

    def _reply(self, message) -> None:
        self._outbox.put(message)
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:                    # the event loop is closed: nobody listens
            pass

    def _deliver(self) -> None:
        """On the event loop: every message waiting. The flag is lowered before the queue is
        read, so a message put after the read schedules a delivery of its own."""
        self._wake_pending = False
        messages = []
        while len(messages) < MAX_BATCH:
            try:
                messages.append(self._outbox.get_nowait())
            except queue.Empty:
                break
        else:
            self._loop.call_soon(self._deliver)     # more are waiting: after the others run
        if messages:
            self._on_messages(messages)


class ProcessClient:
    """The core steps in a spawned process (CUDA cannot be forked) with the same config; its
    steps never wait for the GIL of the server. Messages are pickled over two ZeroMQ sockets
    (ipc://, in a temporary directory). Construction waits until the core is Ready and raises
    EngineStartupError (or the core's ConfigError) if it fails to start."""

    def __init__(self, config: EngineConfig, setup: Setup | None = None):
        self._dir = tempfile.mkdtemp(prefix="loom-core-")
        input_address, output_address = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._context = zmq.Context()
        self._lock = threading.Lock()           # sends come from the loop and from shutdown
        self._output = self._socket(zmq.PULL)
        self._output.bind(output_address)
        self._input = self._socket(zmq.PUSH)   # connected: it queues until the core binds
        self._input.connect(input_address)
        self._stopping = False
        self._closed = False
        self._reader: asyncio.Task | None = None
        self._reader_done = threading.Event()
        level = logging.getLogger("loom").getEffectiveLevel()
        self.process = multiprocessing.get_context("spawn").Process(
            target=core_process.run, name="loom-engine-core",
            args=(config, input_address, output_address, level, setup))
        atexit.register(self._end_process)
        try:
            self.process.start()
            self.info: CoreInfo = self._wait_ready()
        except BaseException:
            self._end_process()
            self._close()
            raise

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)          # unbounded queues: a send never blocks
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        return sock

    def _wait_ready(self) -> CoreInfo:
        poller = zmq.Poller()
        poller.register(self._output, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._output in events:
                message = pickle.loads(self._output.recv())
                if isinstance(message, Ready):
                    return message.info
                if isinstance(message, StartupFailed):
                    self.process.join(KILL_WAIT_S)
                    if message.error_type == "ConfigError":
                        raise ConfigError(message.message)
                    raise EngineStartupError(f"the engine core failed to start: "
                                             f"{message.error_type}: {message.message}")
            elif self.process.sentinel in events:
                self.process.join()
                raise EngineStartupError(
                    f"the engine core process {exit_status(self.process.exitcode)} while "
                    "starting (its output above may say why)")

    # ---- serving -------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, on_messages: OnMessages) -> None:
        self._reader = loop.create_task(self._read(on_messages))

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            if not self._closed:
                self._input.send(data)

    async def _read(self, on_messages: OnMessages) -> None:
        sock = zmq.asyncio.Socket.from_socket(self._output)
        try:
            while True:
                if await sock.poll(POLL_MS, zmq.POLLIN):
                    messages = self._receive_waiting()
                    if messages:
                        on_messages(messages)
                    if messages and isinstance(messages[-1], (CoreFailed, Stopped)):
                        return                  # the core's last message
                elif not self.process.is_alive():
                    if not self._stopping:
                        on_messages([CoreFailed(f"the engine core process "
                                                f"{exit_status(self.process.exitcode)}")])
                    return
        finally:
            sock.close()                        # and the socket it wraps
            self._close()
            self._reader_done.set()

    def _receive_waiting(self) -> list:
        """The messages that have arrived, up to the last one the core sends (CoreFailed,
        Stopped)."""
        messages = []
        while len(messages) < MAX_BATCH:
            try:
                message = pickle.loads(self._output.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            messages.append(message)
            if isinstance(message, (CoreFailed, Stopped)):
                break
        return messages

    def shutdown(self, timeout: float) -> None:
        """Tell the core to stop; wait until its last message is read and its process has
        ended (killed after ``timeout``). Blocking: run it off the event loop."""
        self._stopping = True
        self.send(Shutdown())
        if self._reader is not None:
            self._reader_done.wait(timeout)
        self.process.join(timeout)
        self._end_process()
        if self._reader is None:                # else the reader closes the sockets
            self._close()

    def _end_process(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(KILL_WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        atexit.unregister(self._end_process)

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._input.close()
            self._output.close()
            self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)


def exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
