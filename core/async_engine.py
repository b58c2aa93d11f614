"""AsyncEngine: the Engine stepping in a background thread, for the server.

The thread owns the Engine. Requests and aborts reach it through a command queue; its outputs
reach the asyncio event loop through ``call_soon_threadsafe``, one batch per step, into one
queue per request, so the event loop never waits on a step. A crash inside the engine fails
every request in flight with EngineDeadError and leaves the engine dead (health turns 503).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from loom.engine import Engine
from loom.outputs import CompletionOutput, RequestOutput
from loom.sampling_params import SamplingParams

logger = logging.getLogger("loom")


class EngineDeadError(RuntimeError):
    """The engine thread has failed or been shut down; no request can be served."""


@dataclass
class _Add:
    prompt: str | list[int]
    params: SamplingParams
    request_id: str
    future: asyncio.Future


@dataclass
class _Abort:
    request_ids: list[str]


_STOP = object()


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        # Called in the engine thread after each step and abort: on_step(engine, outputs).
        self.on_step: Callable[[Engine, list[RequestOutput]], None] | None = None
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()          # orders submissions against death and stop
        self._stopped = False
        self._streams: dict[str, asyncio.Queue] = {}   # owned by the event loop
        self._live: set[str] = set()                    # in the engine, owned by its thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifetime (event loop side) --------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="loom-engine", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step (requests still running are failed) and
        release the executor. Blocking: run it off the event loop."""
        with self._lock:
            self._stopped = True
            self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        self.engine.shutdown()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- requests (event loop side) --------------------------------------------------------
    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str, delta: bool = False) -> RequestStream:
        """Queue a request and wait until the engine has taken it: ValueError (naming the
        field) if it refuses it. ``delta``: each output carries only what is new."""
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = outputs
        # The engine always sends deltas: no per-step copy of the whole output so far.
        params = dataclasses.replace(params, output_kind="delta")
        try:
            future = self._loop.create_future()
            self._submit(_Add(prompt, params, request_id, future))
            await future
        except BaseException:
            self._streams.pop(request_id, None)
            self.abort(request_id)     # cancelled after the engine took it: nobody will read
            raise
        return RequestStream(self, request_id, outputs, delta)

    def abort(self, request_id: str) -> None:
        """Abort a request (its KV blocks are freed before the next step). Thread-safe."""
        self._commands.put(_Abort([request_id]))

    def _submit(self, command) -> None:
        with self._lock:
            if self.error is not None:
                raise EngineDeadError(f"the engine has failed: {describe(self.error)}")
            if self._stopped:
                raise EngineDeadError("the engine is shutting down")
            self._commands.put(command)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)

    # ---- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._serve_commands():
                if self.engine.has_unfinished_requests():
                    self._publish(self.engine.step())
            self._publish(self.engine.abort_request(list(self._live)))
            self._call_soon(self._fail_all, EngineDeadError("the engine was shut down"))
        except BaseException as e:  # noqa: BLE001 - any failure kills the engine, loudly
            logger.exception("loom: the engine failed; failing every request in flight")
            self._die(e)

    def _serve_commands(self) -> bool:
        """Apply the queued commands, blocking for one while there is nothing to step.
        False when told to stop."""
        block = not self.engine.has_unfinished_requests()
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            if command is _STOP:
                return False
            self._apply(command)
            block = False

    def _apply(self, command) -> None:
        if isinstance(command, _Abort):
            self._publish(self.engine.abort_request(command.request_ids))
            return
        try:
            self.engine.add_request(command.prompt, command.params, command.request_id)
        except ValueError as e:                 # a bad request fails alone
            self._call_soon(_settle, command.future, e)
            return
        self._live.add(command.request_id)
        self._call_soon(_settle, command.future, None)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        self._live.difference_update(out.request_id for out in outputs if out.finished)
        if self.on_step is not None:
            self.on_step(self.engine, outputs)
        if outputs:
            self._call_soon(self._dispatch, outputs)

    def _die(self, error: BaseException) -> None:
        with self._lock:
            self.error = error
            pending = []
            while not self._commands.empty():
                pending.append(self._commands.get_nowait())
        dead = EngineDeadError(f"the engine has failed: {describe(error)}")
        for command in pending:
            if isinstance(command, _Add):
                self._call_soon(_settle, command.future, dead)
        self._call_soon(self._fail_all, dead)

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:                    # the event loop is closed: nobody listens
            pass


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


class RequestStream:
    """The outputs of one request, in order: deltas (what is new), or with ``delta=False``
    each output the whole result so far. Leaving the iteration early (or ``close()``) aborts
    the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue,
                 delta: bool):
        self.engine = engine
        self.request_id = request_id
        self._outputs = outputs
        self._delta = delta
        self._so_far: RequestOutput | None = None
        self.finished = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                out = await self._next()
                self.finished = out.finished
                if not self._delta:
                    out = self._so_far = accumulate(self._so_far, out)
                yield out
        finally:
            self.close()

    async def final(self) -> RequestOutput:
        """The whole result."""
        whole = None
        async for out in self:
            whole = out if not self._delta else accumulate(whole, out)
        return whole

    async def _next(self) -> RequestOutput:
        """The next delta; a reader that fell behind gets the waiting ones merged into one."""
        item = await self._outputs.get()
        while not self._outputs.empty() and not isinstance(item, BaseException):
            following = self._outputs.get_nowait()
            item = following if isinstance(following, BaseException) else accumulate(item, following)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine._streams.pop(self.request_id, None)
        if not self.finished:
            self.engine.abort(self.request_id)

    def __del__(self) -> None:   # a stream dropped unread still frees its blocks
        self.close()


def accumulate(so_far: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """``so_far`` extended by ``delta``: per sequence, text, token ids and logprobs appended,
    the latest finish and stop reasons."""
    if so_far is None:
        return delta
    by_index = {c.index: c for c in so_far.outputs}
    for d in delta.outputs:
        c = by_index.get(d.index)
        by_index[d.index] = d if c is None else CompletionOutput(
            d.index, c.text + d.text, c.token_ids + d.token_ids, d.finish_reason,
            d.stop_reason, None if d.logprobs is None else (c.logprobs or []) + d.logprobs,
            d.cumulative_logprob)
    return dataclasses.replace(delta, outputs=[by_index[i] for i in sorted(by_index)])
