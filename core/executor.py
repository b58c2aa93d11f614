"""Executors run the model for the engine. The in-process one wraps a single ModelRunner; the
multi-process one (tensor parallelism, loom.distributed.executor) implements the same calls over
one runner per rank."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loom import ops
from loom.config import EngineConfig
from loom.distributed.group import SINGLE, TensorParallelGroup
from loom.model_config import ModelConfig
from loom.model_runner import ModelRunner
from loom.platform import Platform
from loom.quant import QuantMethod
from loom.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("loom")


@dataclass
class RunnerSpec:
    """What a ModelRunner is built from, as the engine resolved it: values and plugin classes
    (sent pickled, once, to every rank of a tensor-parallel engine)."""
    config: EngineConfig
    model_config: ModelConfig
    platform: Platform
    attn_cls: type
    quant_method: QuantMethod
    model_cls: type
    fused_ops: ops.FusedOps
    dtype: torch.dtype
    block_size: int
    max_model_len: int
    max_num_batched_tokens: int

    def build(self, device_index: int = 0, tp: TensorParallelGroup = SINGLE) -> ModelRunner:
        ops.use(self.fused_ops)
        return ModelRunner(self.config, self.model_config, self.platform, self.attn_cls,
                           self.quant_method, self.model_cls, self.dtype, self.block_size,
                           self.max_model_len, self.max_num_batched_tokens, device_index, tp)


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


def make_executor(spec: RunnerSpec) -> Executor:
    """One process for tensor-parallel-size 1, else one per rank."""
    if spec.config.tensor_parallel_size == 1:
        return UniProcExecutor(spec.build())
    from loom.distributed.executor import MultiprocExecutor
    return MultiprocExecutor(spec)
