"""The processes of a tensor-parallel model: one rank per device, rank 0 the engine's process.

A World comes from one of:
- ``spawn``: ``loom serve``/``generate`` on one machine. This process is rank 0; ranks
  1..N-1 are children started with torch.multiprocessing (spawn), meeting on a free local port.
- ``from_env``: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), on one
  machine or several; each process is one rank, rank 0 runs the engine, the others the worker
  loop (loom.distributed.worker).

Two process groups: the default one, of the platform's backend (nccl on CUDA and ROCm, gloo on
the CPU), for the model's collectives; and a gloo group for control, on which rank 0 broadcasts
each step's message. Control waits as long as the server idles; a model collective waits at most
``STEP_TIMEOUT``. A dead peer fails the next collective (gloo at once; NCCL when rank 0 aborts
it, or at the timeout); rank 0 also watches the children it spawned.
"""
from __future__ import annotations

import logging
import multiprocessing.connection
import os
import socket
import struct
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from loom.distributed.group import TensorParallelGroup

logger = logging.getLogger("loom")

STEP_TIMEOUT = timedelta(minutes=5)       # one model collective
CONTROL_TIMEOUT = timedelta(days=365)     # a worker waiting for the next step of an idle server
HEADER = 1 << 14                          # bytes broadcast per message; more go in a second one
_PREFIX = struct.Struct("<iq")            # kind, payload length

_current: World | None = None


def current_world() -> World | None:
    """The World this process belongs to, if one is set up."""
    return _current


class World:
    def __init__(self, rank: int, size: int, local_rank: int, backend: str,
                 processes: list | None = None):
        global _current
        self.rank, self.size, self.local_rank, self.backend = rank, size, local_rank, backend
        self.processes = processes or []     # children spawned here: ranks 1..N-1
        self.cpu_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.tp = TensorParallelGroup(rank, size, dist.group.WORLD)
        self.closing = False
        self.engine = None           # a weak reference to the executor running on the ranks
        self.dead: tuple[int, int] | None = None     # (rank, exit code) of a spawned rank
        self._reaping = threading.Lock()
        if self.processes:
            threading.Thread(target=self._watch, name="loom-rank-watchdog", daemon=True).start()
        _current = self

    # ---- the control channel ---------------------------------------------------------------
    def send(self, kind: int, payload: bytes = b"") -> None:
        """Rank 0: broadcast one message to the other ranks."""
        head = _PREFIX.pack(kind, len(payload)) + payload[:HEADER - _PREFIX.size]
        buffer = torch.zeros(HEADER, dtype=torch.uint8)
        buffer[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        dist.broadcast(buffer, src=0, group=self.cpu_group)
        rest = payload[HEADER - _PREFIX.size:]
        if rest:
            dist.broadcast(torch.frombuffer(bytearray(rest), dtype=torch.uint8), src=0,
                           group=self.cpu_group)

    def receive(self) -> tuple[int, bytes]:
        """Ranks 1..N-1: the next message from rank 0, (kind, payload)."""
        buffer = torch.empty(HEADER, dtype=torch.uint8)
        dist.broadcast(buffer, src=0, group=self.cpu_group)
        kind, length = _PREFIX.unpack(buffer[:_PREFIX.size].numpy().tobytes())
        first = min(length, HEADER - _PREFIX.size)
        payload = buffer[_PREFIX.size:_PREFIX.size + first].numpy().tobytes()
        if length > first:
            rest = torch.empty(length - first, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.cpu_group)
            payload += rest.numpy().tobytes()
        return kind, payload

    def min(self, value: int) -> int:
        """The smallest ``value`` of all ranks."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def gather_errors(self, error: str | None) -> list[tuple[int, str]]:
        """Every rank's error (None if it has none) on every rank: [(rank, error)]."""
        errors: list = [None] * self.size
        dist.all_gather_object(errors, error, group=self.cpu_group)
        return [(rank, e) for rank, e in enumerate(errors) if e is not None]

    # ---- liveness of spawned ranks ----------------------------------------------------------
    def exited(self, wait: float = 0.0) -> list[tuple[int, int]]:
        """(rank, exit code) of the spawned ranks that have exited, waiting up to ``wait``
        seconds for one to."""
        with self._reaping:          # one thread reaps a child; another would see no exit code
            alive = {p.sentinel: p for p in self.processes if p.exitcode is None}
            if wait and alive:
                for sentinel in multiprocessing.connection.wait(list(alive), timeout=wait):
                    alive[sentinel].join(timeout=wait)      # closed its end: reap it
            return [(rank, p.exitcode) for rank, p in enumerate(self.processes, start=1)
                    if p.exitcode is not None]

    def _watch(self) -> None:
        """Wait for a spawned rank to exit; unless closing, record it and end the model
        collectives that would wait for it."""
        multiprocessing.connection.wait([p.sentinel for p in self.processes])
        exited = self.exited(wait=5.0)
        if self.closing or not exited:
            return
        self.dead = exited[0]
        logger.error("loom: tensor-parallel rank %d exited (code %d)", *self.dead)
        self.abort_device_group()

    def abort_device_group(self) -> None:
        """Fail the model collectives waiting on a dead rank (NCCL waits for them otherwise;
        gloo fails them by itself)."""
        if self.backend == "gloo":
            return
        try:
            from torch.distributed.distributed_c10d import _abort_process_group
            _abort_process_group(dist.group.WORLD)
        except Exception:  # noqa: BLE001 - best effort: the timeout still ends the wait
            logger.exception("loom: could not abort the %s process group", self.backend)

    # ---- the end ---------------------------------------------------------------------------
    def close(self, exit_message: int | None = None) -> None:
        """Send ``exit_message`` (rank 0, when the others can still hear it), wait for the
        spawned ranks, and leave torch.distributed."""
        global _current
        self.closing = True
        if exit_message is not None:
            try:
                self.send(exit_message)
            except Exception:  # noqa: BLE001 - a dead peer: the children are ended below
                pass
        for p in self.processes:
            p.join(timeout=10)
            if p.exitcode is None:
                p.kill()
                p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()
        if _current is self:
            _current = None


# ---- ways to start one ----------------------------------------------------------------------
def join(rank: int, size: int, local_rank: int, backend: str, init_method: str,
         processes: list | None = None) -> World:
    """Join the process group as ``rank`` and build the World around it."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=STEP_TIMEOUT)
    return World(rank, size, local_rank, backend, processes)


def spawn(size: int, backend: str) -> World:
    """This process as rank 0, ranks 1..size-1 as spawned children running the worker loop."""
    from loom.distributed import worker

    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = torch.multiprocessing.get_context("spawn")
    processes = []
    try:
        for rank in range(1, size):
            p = context.Process(target=worker.run_spawned, name=f"loom-rank-{rank}", daemon=True,
                                args=(rank, size, backend, init_method))
            p.start()
            processes.append(p)
        return join(0, size, 0, backend, init_method, processes)
    except BaseException:
        for p in processes:
            p.kill()
        raise


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def torchrun_rank() -> int:
    """This process's rank under torchrun; 0 when not under torchrun."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def from_env(backend: str) -> World:
    """This process's rank of a torchrun launch."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return join(rank, size, local_rank, backend, "env://")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
