"""The engine core's serving loop and the messages it exchanges with the server's front end.

The loop applies what the front end sent (new requests, finished sequences, utility calls),
steps the core while it has work, and sends all outputs of one step as one StepOutputs. It does
not know its transport: a thread passes the messages through queues (core_client.ThreadClient),
a process of its own pickles them over ZeroMQ (core_process). Every message is plain data.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from loom.engine_core import CoreInfo, CoreRequest, CoreStats, EngineCore, SequenceUpdate
from loom.request import RequestStatus
from loom.scheduler import SchedulerStats


# ---- front end -> core (and CoreRequest) -------------------------------------------------------
@dataclass
class Finish:
    """End these sequences (a client went away, or a stop string ended them)."""
    seq_ids: list[str]
    status: RequestStatus


@dataclass
class UtilityCall:
    """Call ``EngineCore.<method>(*args)`` between two steps and send back a UtilityResult."""
    call_id: int
    method: str
    args: tuple = ()


@dataclass
class Shutdown:
    """End every sequence and stop."""


# ---- core -> front end ---------------------------------------------------------------------------
@dataclass
class Ready:
    """The core process has started (the first message it sends)."""
    info: CoreInfo


@dataclass
class StartupFailed:
    """The core process could not start (the only message it sends then)."""
    error_type: str
    message: str


@dataclass
class StepOutputs:
    """What one step (or one round of messages) did: the sequences it changed, the scheduler's
    figures afterwards, and the requests the core refused (request id -> why)."""
    updates: list[SequenceUpdate]
    stats: SchedulerStats
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass
class UtilityResult:
    call_id: int
    result: object = None
    error: str | None = None


@dataclass
class Stopped:
    """The core stopped on Shutdown, aborting ``num_aborted`` sequences still running; ``stats``
    as it was left."""
    num_aborted: int
    stats: CoreStats


@dataclass
class CoreFailed:
    """The core failed; it serves nothing more (the last message it sends)."""
    error: str


class EngineStartupError(RuntimeError):
    """The engine core could not start (its process reported why, or ended without a word)."""


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


# ---- the loop ------------------------------------------------------------------------------------
def serve(core: EngineCore, receive: Callable[[bool], object | None],
          send: Callable[[object], None]) -> None:
    """Serve until Shutdown. ``receive(block)``: the next message, or None when there is none
    and ``block`` is false. Exceptions from the core propagate: the caller reports them."""
    while True:
        rejected: dict[str, str] = {}
        received = False
        block = not core.has_unfinished_requests()
        while (message := receive(block)) is not None:
            if isinstance(message, Shutdown):
                running = list(core.scheduler.requests)
                core.finish_requests(running, RequestStatus.FINISHED_ABORTED)
                send(Stopped(len(running), core.stats()))
                return
            apply(core, message, rejected, send)
            received, block = True, False
        if core.has_unfinished_requests():
            send(StepOutputs(core.step(), core.scheduler.stats(), rejected))
        elif received:
            send(StepOutputs([], core.scheduler.stats(), rejected))


def apply(core: EngineCore, message, rejected: dict[str, str], send) -> None:
    if isinstance(message, CoreRequest):
        try:
            core.add_request(message)
        except ValueError as e:                 # checked in the front end too: a bug if seen
            rejected[message.request_id] = str(e)
    elif isinstance(message, Finish):
        core.finish_requests(message.seq_ids, message.status)
    elif isinstance(message, UtilityCall):
        send(call(core, message))
    else:
        raise TypeError(f"the engine core got an unknown message: {type(message).__name__}")


def call(core: EngineCore, message: UtilityCall) -> UtilityResult:
    if message.method.startswith("_") or not callable(getattr(core, message.method, None)):
        return UtilityResult(message.call_id, error=f"EngineCore has no method {message.method!r}")
    try:
        return UtilityResult(message.call_id, getattr(core, message.method)(*message.args))
    except Exception as e:  # noqa: BLE001 - a failed call is the caller's error, not the core's
        return UtilityResult(message.call_id, error=describe(e))
