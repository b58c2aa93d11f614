"""The engine core in a process of its own: the target that core_client.ProcessClient spawns.

It builds the EngineCore from the server's EngineConfig and says Ready (or StartupFailed), then
serves (core_loop.serve) over two ZeroMQ sockets of the front end's: messages in, outputs out,
each one pickled plain data. It ignores SIGINT (Ctrl-C reaches the whole process group; the
front end drains its requests first and then sends Shutdown) and stops by itself when the front
end's process is gone.
"""
from __future__ import annotations

import gc
import logging
import multiprocessing
import pickle
import signal
import sys
from collections.abc import Callable

import zmq

from loom.config import ConfigError, EngineConfig
from loom.core_loop import CoreFailed, Ready, StartupFailed, describe, serve
from loom.engine_core import EngineCore

logger = logging.getLogger("loom")

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
LINGER_MS = 5000            # how long a last message may wait for the front end at exit


class FrontEndGone(Exception):
    """The process that spawned this one has ended: nobody reads the outputs."""


def run(config: EngineConfig, input_address: str, output_address: str, log_level: int,
        setup: Callable[[EngineCore], None] | None = None) -> None:
    """The process's main. ``setup``: called on the EngineCore before it serves (a function
    importable by name: tests use it to instrument the core)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    context = zmq.Context()
    inputs, outputs = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    for sock in (inputs, outputs):
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, 0)          # never block a step on a slow reader
        sock.setsockopt(zmq.RCVHWM, 0)
    inputs.bind(input_address)
    outputs.connect(output_address)

    def send(message) -> None:
        outputs.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    core = start(config, setup, send)
    failed = core is None
    try:
        if core is not None:
            serve(core, receiver(inputs), send)
    except FrontEndGone:
        logger.warning("loom: the server process is gone; the engine core stops")
    except Exception as e:  # noqa: BLE001 - any failure ends the core, loudly
        logger.exception("loom: the engine core failed")
        send(CoreFailed(describe(e)))
        failed = True
    finally:
        if core is not None:
            core.shutdown()
        context.destroy(linger=LINGER_MS)
    if failed:
        sys.exit(1)


def start(config: EngineConfig, setup, send) -> EngineCore | None:
    try:
        core = EngineCore(config)
        if setup is not None:
            setup(core)
    except Exception as e:  # noqa: BLE001 - reported to the front end, which raises it
        if not isinstance(e, ConfigError):          # a config error says all in its message
            logger.exception("loom: the engine core failed to start")
        send(StartupFailed(type(e).__name__, str(e)))
        return None
    gc.collect()        # out of the collector's reach: what start-up left alive (torch, the
    gc.freeze()         # model), so a full collection does not stall a step for 100+ ms
    send(Ready(core.info()))
    return core


def receiver(inputs: zmq.Socket):
    """receive(block) for core_loop.serve, watching the front end's process meanwhile."""
    parent = multiprocessing.parent_process()
    poller = zmq.Poller()
    poller.register(inputs, zmq.POLLIN)
    poller.register(parent.sentinel, zmq.POLLIN)     # readable once the parent has ended

    def receive(block: bool):
        while True:
            events = dict(poller.poll(None if block else 0))
            if parent.sentinel in events:
                raise FrontEndGone
            if inputs in events:
                return pickle.loads(inputs.recv())
            if not block:
                return None
    return receive
