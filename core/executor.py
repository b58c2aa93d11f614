"""Executors run the model for the engine. The in-process one wraps a single ModelRunner;
multi-process executors (tensor parallelism) implement the same three calls."""
from __future__ import annotations

import logging

from loom.model_runner import ModelRunner
from loom.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("loom")


class Executor:
    """What the engine needs from whoever runs the model."""

    def determine_num_blocks(self) -> int:
        """Size the KV cache (from the config or by profiling), allocate it, capture graphs,
        return the number of blocks."""
        raise NotImplementedError

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_async(sched).result()

    def execute_async(self, sched: SchedulerOutput):
        """Launch a step; returns a handle whose ``result()`` is the ModelRunnerOutput."""
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


class UniProcExecutor(Executor):
    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def determine_num_blocks(self) -> int:
        num_blocks = self.runner.determine_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.capture_graphs()
        return num_blocks

    def execute_async(self, sched: SchedulerOutput):
        return self.runner.execute_async(sched)
