"""MultiprocExecutor: the engine's executor for tensor-parallel-size N > 1.

This process is rank 0: it runs the scheduler (in the engine) and its own shard. Each step it
broadcasts the SchedulerOutput on the control channel, then runs the step; the other ranks run
the same step on theirs (loom.distributed.worker). Rank 0 samples. A rank that dies puts the
executor in a failed state: the step in flight and every later one raise RankFailedError.
"""
from __future__ import annotations

import logging
import os
import pickle
import weakref

import torch

from loom.config import ConfigError
from loom.distributed import messages
from loom.distributed.world import (World, current_world, from_env, launched_by_torchrun,
                                    spawn, torchrun_rank)
from loom.distributed.worker import prepare_cache, start_session
from loom.executor import Executor, RunnerSpec
from loom.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("loom")


class RankFailedError(RuntimeError):
    """A tensor-parallel rank died or failed; the engine cannot run another step."""


class MultiprocExecutor(Executor):
    def __init__(self, spec: RunnerSpec):
        size = spec.config.tensor_parallel_size
        self.world, self.owns_world = acquire_world(spec.platform.dist_backend, size)
        self.world.engine = weakref.ref(self)
        self.failure: str | None = None
        self.closed = False
        self.num_threads = torch.get_num_threads()     # restored at shutdown (CPU ranks share)
        try:
            self.world.send(messages.SESSION, pickle.dumps(spec))
            self.runner = start_session(self.world, lambda: spec)
        except BaseException:
            self.shutdown()
            raise
        logger.info("loom: tensor parallel over %d ranks (%s), this process is rank 0", size,
                    self.world.backend)

    def determine_num_blocks(self) -> int:
        return prepare_cache(self.world, self.runner)

    def execute_async(self, sched: SchedulerOutput):
        self._raise_if_failed()
        try:
            self.world.send(messages.STEP, messages.encode_step(sched))
            pending = self.runner.execute_async(sched)
        except Exception as e:
            failure = self._step_failed(e)
            if failure is e:
                raise
            raise failure from e
        return _CheckedOutput(pending, self)

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        torch.set_num_threads(self.num_threads)
        self.world.engine = None
        healthy = self.failure is None and self.world.dead is None
        if self.owns_world:
            self.world.close(messages.EXIT if healthy else None)
        elif healthy:
            self.world.send(messages.END)

    # ---- failures --------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self.failure is None and self.world.dead is not None:
            self.failure = describe_exit(*self.world.dead)
        if self.failure is not None:
            raise RankFailedError(f"{self.failure}; the engine cannot continue")

    def _step_failed(self, error: Exception) -> Exception:
        """A step raised: the ranks are out of step from now on. The error to raise:
        RankFailedError when a rank has died (its death failed the step), else ``error``."""
        exited = self.world.exited(wait=2.0)
        if exited:
            self.failure = self.failure or describe_exit(*exited[0])
            return RankFailedError(f"{self.failure}; the engine cannot continue")
        self.failure = self.failure or f"a step failed ({type(error).__name__}: {error})"[:300]
        return error


class _CheckedOutput:
    """A step's pending output that raises instead if a rank failed meanwhile (its tokens
    would come from an incomplete step)."""

    def __init__(self, pending, executor: MultiprocExecutor):
        self.pending, self.executor = pending, executor

    def result(self) -> ModelRunnerOutput:
        try:
            out = self.pending.result()
        except Exception as e:
            failure = self.executor._step_failed(e)
            if failure is e:
                raise
            raise failure from e
        self.executor._raise_if_failed()
        return out


def describe_exit(rank: int, code: int) -> str:
    how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return f"tensor-parallel rank {rank} {how}"


def acquire_world(backend: str, size: int) -> tuple[World, bool]:
    """(the World to run on, whether this executor set it up and so tears it down)."""
    world = current_world()
    if world is not None:
        if world.size != size or world.rank != 0:
            raise ConfigError(f"config key 'tensor-parallel-size': {size}, but this process is "
                              f"rank {world.rank} of {world.size}")
        if world.backend != backend:
            raise RuntimeError(f"the ranks of this process run {world.backend}, but the platform "
                               f"needs {backend}")
        if world.engine is not None and world.engine() is not None:
            raise RuntimeError("a tensor-parallel engine already runs on this process's ranks; "
                               "shut it down first (engine.shutdown())")
        return world, False
    if launched_by_torchrun():
        if int(os.environ["WORLD_SIZE"]) != size:
            raise ConfigError(f"config key 'tensor-parallel-size': {size}, but torchrun started "
                              f"{os.environ['WORLD_SIZE']} ranks (WORLD_SIZE); they must be equal")
        if torchrun_rank() != 0:
            raise RuntimeError("under torchrun only rank 0 builds an engine; the other ranks run "
                               "loom.distributed.worker.run_from_env")
        return from_env(backend), True
    return spawn(size, backend), True
