"""AsyncEngine: the server's engine. Requests in, RequestStreams out; the event loop never
waits on a step.

The engine core (scheduler, KV cache, executor) steps elsewhere: in a process of its own (the
default, core_client.ProcessClient) or in a thread (ThreadClient). It sends the outputs of each
step as one message of token ids; here, on the event loop, the output processor turns them into
RequestOutputs (detokenized, stop strings checked) for one inbox per request. Requests are
tokenized and checked here too, so a bad one fails alone before it reaches the core. A core that
fails, or whose process dies, fails every request in flight with EngineDeadError and leaves the
engine dead (health turns 503).

Under load the work per token shrinks: the steps that wait when the event loop gets to them are
processed as one (one output per request for all of them), and a reader that has not taken its
outputs yet finds them merged into one (one SSE event for several tokens).
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from loom.config import ENGINE_CORE_MODES, ConfigError, EngineConfig
from loom.core_loop import CoreFailed, Finish, StepOutputs, Stopped, UtilityCall, UtilityResult
from loom.engine_core import CoreInfo, CoreStats, EngineCore, sequence_ids
from loom.input_processor import prepare_request
from loom.loader import load_generation_config, load_tokenizer
from loom.output_processor import OutputProcessor
from loom.outputs import CompletionOutput, RequestOutput
from loom.request import RequestStatus
from loom.sampling_params import SamplingParams
from loom.scheduler import SchedulerStats

logger = logging.getLogger("loom")


class EngineDeadError(RuntimeError):
    """The engine core has failed or been shut down; no request can be served."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine_core: str = "process",
                 setup: Callable[[EngineCore], None] | None = None):
        """Start the engine core (``engine_core``: "process" or "thread") and load the
        tokenizer. ``setup``: called on the EngineCore before it serves (in the core's
        process: a function importable by name), for tests and debugging."""
        from loom.core_client import ProcessClient, ThreadClient

        if engine_core not in ENGINE_CORE_MODES:
            raise ConfigError(f"engine-core: expected one of {', '.join(ENGINE_CORE_MODES)}, "
                              f"got {engine_core!r}")
        self.client = (ProcessClient if engine_core == "process" else ThreadClient)(config, setup)
        self.info: CoreInfo = self.client.info
        try:
            path = Path(self.info.model_path)
            self.tokenizer = (None if config.skip_tokenizer_init
                              else load_tokenizer(config.tokenizer or path))
            self.generation_config = load_generation_config(path)
        except BaseException:
            self.client.shutdown(timeout=5.0)
            raise
        self.outputs = OutputProcessor(self.tokenizer, speculative=self.info.speculative)
        # Called on the event loop after each step and abort: on_step(stats, outputs); stats
        # is None after an abort.
        self.on_step: Callable[[SchedulerStats | None, list[RequestOutput]], None] | None = None
        self.error: EngineDeadError | None = None
        self.final_stats: CoreStats | None = None    # the core's, when it stopped
        self._streams: dict[str, StreamInbox] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifetime --------------------------------------------------------------------------
    def start(self) -> None:
        """Start serving; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self.client.start(self._loop, self._on_messages)

    @property
    def started(self) -> bool:
        return self._loop is not None

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._stopped and self.started and self.client.alive

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the core (requests still running are failed) and wait for it. Blocking: run
        it off the event loop."""
        self._stopped = True
        self.client.shutdown(timeout)
        self._call_soon(self._fail_all, EngineDeadError("the engine was shut down"))

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- requests (on the event loop) --------------------------------------------------------
    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str, delta: bool = False) -> RequestStream:
        """Check and queue a request: ValueError (naming the field) if it is bad. ``delta``:
        each output carries only what is new."""
        self._check_alive()
        if request_id in self.outputs.groups:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        # The output processor makes deltas: no per-step copy of the whole output so far.
        params = dataclasses.replace(params, output_kind="delta")
        text, request = prepare_request(prompt, params, request_id, self.tokenizer,
                                        self.info.vocab_size, self.info.max_model_len)
        self.outputs.add(request_id, text, request.prompt_token_ids, params,
                         sequence_ids(request_id, params.n))
        inbox = self._streams[request_id] = StreamInbox()
        self.client.send(request)
        return RequestStream(self, request_id, inbox, delta)

    def abort(self, request_id: str) -> None:
        """End a request now; the core frees its KV blocks before its next step."""
        seq_ids = self.outputs.sequence_ids([request_id])
        if not seq_ids:
            return                              # finished already
        outputs = self.outputs.finish_aborted(seq_ids)
        if self.on_step is not None:
            self.on_step(None, outputs)
        self.client.send(Finish(seq_ids, RequestStatus.FINISHED_ABORTED))

    async def call_core(self, method: str, *args):
        """``EngineCore.<method>(*args)``, run by the core between two steps (after every
        message sent before); e.g. ``await call_core("stats")``."""
        self._check_alive()
        call_id = next(self._call_ids)
        future = self._calls[call_id] = self._loop.create_future()
        self.client.send(UtilityCall(call_id, method, args))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        if self._stopped:
            raise EngineDeadError("the engine is shutting down")

    # ---- what the core sends (on the event loop) ---------------------------------------------
    def _on_messages(self, messages: list) -> None:
        try:
            self._handle_all(messages)
        except Exception as e:  # noqa: BLE001 - requests must fail, not wait for outputs
            logger.exception("loom: the engine's outputs could not be processed")
            self._die(f"processing the engine core's outputs failed: {type(e).__name__}: {e}")

    def _handle_all(self, messages: list) -> None:
        """In order; the StepOutputs that follow one another are processed as one."""
        steps: list[StepOutputs] = []
        for message in messages:
            if isinstance(message, StepOutputs):
                steps.append(message)
                continue
            if steps:
                self._on_step_outputs(steps)
                steps = []
            self._handle(message)
        if steps:
            self._on_step_outputs(steps)

    def _handle(self, message) -> None:
        if isinstance(message, UtilityResult):
            self._on_utility_result(message)
        elif isinstance(message, Stopped):
            self.final_stats = message.stats
            if message.num_aborted:
                logger.warning("loom: the engine core stopped with %d sequences still running; "
                               "they were aborted", message.num_aborted)
        elif isinstance(message, CoreFailed):
            self._die(message.error)

    def _on_step_outputs(self, steps: list[StepOutputs]) -> None:
        updates = steps[0].updates if len(steps) == 1 else [u for s in steps for u in s.updates]
        outputs, stopped = self.outputs.process(updates)
        if stopped:
            self.client.send(Finish(stopped, RequestStatus.FINISHED_STOPPED))
        for step in steps:
            for request_id, why in step.rejected.items():
                self._reject(request_id, why)
        if self.on_step is not None:
            self.on_step(steps[-1].stats, outputs)
        streams = self._streams
        for out in outputs:
            inbox = streams.get(out.request_id)
            if inbox is not None:
                inbox.put(out)

    def _on_utility_result(self, message: UtilityResult) -> None:
        future = self._calls.get(message.call_id)
        if future is None or future.done():
            return
        if message.error is None:
            future.set_result(message.result)
        else:
            future.set_exception(RuntimeError(f"engine core call failed: {message.error}"))

    def _reject(self, request_id: str, why: str) -> None:
        self.outputs.finish_aborted(self.outputs.sequence_ids([request_id]))
        inbox = self._streams.get(request_id)
        if inbox is not None:
            inbox.fail(ValueError(why))

    def _die(self, error: str) -> None:
        if self.error is not None:
            return
        self.error = EngineDeadError(f"the engine has failed: {error}")
        logger.error("loom: %s; failing every request in flight", self.error)
        self._fail_all(self.error)

    def _fail_all(self, error: EngineDeadError) -> None:
        for inbox in self._streams.values():
            inbox.fail(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)

    def _call_soon(self, fn, *args) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:                    # the event loop is closed: nobody listens
            pass


class StreamInbox:
    """The outputs of one request that its reader has not taken yet, held by the engine. The
    reader is woken once however many arrive before it runs (with ``wake_on_finish``, only by
    the finished one), and takes them merged into one."""

    def __init__(self):
        self._outputs: list[RequestOutput] = []
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self.wake_on_finish = False

    def put(self, out: RequestOutput) -> None:
        self._outputs.append(out)
        if out.finished or not self.wake_on_finish:
            self._wake()

    def fail(self, error: BaseException) -> None:
        """The reader gets ``error`` (instead of any output still waiting)."""
        self._error = error
        self._wake()

    async def take(self) -> RequestOutput:
        while self._error is None and not self._ready():
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._error is not None:
            raise self._error
        outputs, self._outputs = self._outputs, []
        return outputs[0] if len(outputs) == 1 else merge_deltas(outputs)

    def _ready(self) -> bool:
        return bool(self._outputs) and (self._outputs[-1].finished or not self.wake_on_finish)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class RequestStream:
    """The outputs of one request, in order: deltas (what is new), or with ``delta=False``
    each output the whole result so far. A reader that fell behind gets the deltas waiting
    merged into one. Leaving the iteration early (or ``close()``) aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, inbox: StreamInbox, delta: bool):
        self.engine = engine
        self.request_id = request_id
        self._inbox = inbox
        self._delta = delta
        self._so_far: RequestOutput | None = None
        self.finished = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                out = await self._inbox.take()
                self.finished = out.finished
                if not self._delta:
                    out = self._so_far = accumulate(self._so_far, out)
                yield out
        finally:
            self.close()

    async def final(self) -> RequestOutput:
        """The whole result; the reader wakes only when the request has finished."""
        self._inbox.wake_on_finish = True
        whole = None
        async for out in self:
            whole = out if not self._delta else accumulate(whole, out)
        return whole

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine._streams.pop(self.request_id, None)
        if not self.finished:
            self.engine.abort(self.request_id)

    def __del__(self) -> None:   # a stream dropped unread still frees its blocks
        if not self._closed:
            self.engine._call_soon(self.close)


def accumulate(so_far: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """``so_far`` extended by ``delta``."""
    return delta if so_far is None else merge_deltas([so_far, delta])


def merge_deltas(outputs: list[RequestOutput]) -> RequestOutput:
    """Deltas of one request, in order, as one: per sequence the texts, token ids and logprobs
    joined, the last finish and stop reasons; the rest from the last delta."""
    parts: dict[int, list[CompletionOutput]] = {}
    for out in outputs:
        for c in out.outputs:
            parts.setdefault(c.index, []).append(c)
    return dataclasses.replace(outputs[-1], outputs=[join(parts[i]) for i in sorted(parts)])


def join(parts: list[CompletionOutput]) -> CompletionOutput:
    if len(parts) == 1:
        return parts[0]
    last = parts[-1]
    logprobs = (None if last.logprobs is None
                else [entry for c in parts for entry in (c.logprobs or ())])
    return CompletionOutput(last.index, "".join(c.text for c in parts),
                            [t for c in parts for t in c.token_ids], last.finish_reason,
                            last.stop_reason, logprobs, last.cumulative_logprob)
