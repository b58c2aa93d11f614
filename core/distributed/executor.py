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
        self.failure: str | None = None
        self.closed = False
        self.num_threads = torch.get_num_threads()     # restored at shutdown (CPU ranks share)
        self.world.watch(self._on_rank_exit)
        try:
            self.world.send(messages.SESSION, pickle.dumps(spec))
            self.runner = start_session(self.world, spec)
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
            raise self._failed(e) from e
        return _CheckedOutput(pending, self)

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        torch.set_num_threads(self.num_threads)
        if self.owns_world:
            self.world.close(messages.EXIT if self.failure is None else None)
        elif self.failure is None:
            self.world.send(messages.END)

    # ---- failures --------------------------------------------------------------------------
    def _on_rank_exit(self, rank: int, code: int) -> None:
        self.failure = self.failure or describe_exit(rank, code)
        logger.error("loom: %s", self.failure)
        self.world.abort_device_group()

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise RankFailedError(f"{self.failure}; the engine cannot continue")

    def _failed(self, error: Exception) -> RankFailedError:
        """The error for a step whose collectives failed: which rank died, if one did."""
        if self.failure is None:
            exited = self.world.exited(wait=2.0)
            self.failure = (describe_exit(*exited[0]) if exited else
                            f"a tensor-parallel collective failed ({type(error).__name__}: "
                            f"{str(error)[:200]})")
        return RankFailedError(f"{self.failure}; the engine cannot continue")


class _CheckedOutput:
    """A step's pending output that raises instead if a rank failed meanwhile (its tokens
    would come from an incomplete step)."""

    def __init__(self, pending, executor: MultiprocExecutor):
        self.pending, self.executor = pending, executor

    def result(self) -> ModelRunnerOutput:
        try:
            out = self.pending.result()
        except Exception as e:
            raise self.executor._failed(e) from e
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
