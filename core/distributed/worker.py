"""Ranks 1..N-1 of a tensor-parallel engine: a loop over rank 0's messages, and the start-up
every rank goes through (rank 0 in MultiprocExecutor): build the runner on this rank's shard,
agree that every rank did, size the KV cache to the fewest blocks any rank can hold.

A worker runs each step it receives on its shard and reports nothing: rank 0 samples and
broadcasts the tokens inside the step. An error in a step ends the worker's process, which fails
rank 0's next collective: the engine errors out instead of waiting.
"""
from __future__ import annotations

import gc
import logging
import os
import pickle
from collections.abc import Callable

import torch

from loom.distributed import messages
from loom.distributed.world import World, from_env, join

logger = logging.getLogger("loom")


class RankStartError(RuntimeError):
    """Another rank failed to build its part of the model."""


def start_session(world: World, load_spec: Callable[[], object]):
    """This rank's ModelRunner, built from the RunnerSpec ``load_spec()`` returns, once every
    rank has built its own. On rank 0 a failure anywhere raises (its own error, else the first
    other rank's); on the others it returns None."""
    runner, error, failure = None, None, None
    try:
        spec = load_spec()
        spec.platform.set_device(world.local_rank)
        if spec.platform.device_type == "cpu":
            share_cpu_cores(world.size)
        torch.manual_seed(spec.config.seed)
        runner = spec.build(world.local_rank, world.tp)
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        error, failure = f"{type(e).__name__}: {e}", e
    errors = world.gather_errors(error)
    if not errors:
        return runner
    if world.rank != 0:
        if failure is not None:
            logger.error("loom: rank %d could not build its shard: %s", world.rank, error)
        return None
    if failure is not None:
        raise failure
    rank, message = errors[0]
    raise RankStartError(f"tensor-parallel rank {rank} failed to build its shard: {message}")


def share_cpu_cores(num_ranks: int) -> None:
    """Ranks on the CPU split its cores: threads of several ranks spinning on the same cores
    slow every collective down by orders of magnitude."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // num_ranks))


def prepare_cache(world: World, runner) -> int:
    """Allocate the KV cache with the fewest blocks any rank has room for, capture graphs."""
    num_blocks = world.min(runner.determine_num_blocks())
    runner.allocate_kv_cache(num_blocks)
    runner.capture_graphs()
    return num_blocks


def serve(world: World) -> None:
    """Run rank 0's sessions and steps until it says EXIT."""
    runner = None
    while True:
        kind, payload = world.receive()
        if kind == messages.STEP:
            runner.execute_async(messages.decode_step(payload))
        elif kind == messages.SESSION:
            runner = _release(runner)
            runner = start_session(world, lambda: pickle.loads(payload))
            if runner is not None:
                prepare_cache(world, runner)
        elif kind == messages.END:
            runner = _release(runner)
        elif kind == messages.EXIT:
            return
        else:
            raise RuntimeError(f"rank {world.rank}: unknown control message {kind}")


def _release(runner) -> None:
    if runner is not None:
        platform = runner.platform
        del runner
        gc.collect()
        platform.empty_cache()
    return None


def run_spawned(rank: int, size: int, backend: str, init_method: str) -> None:
    """The entry point of a rank spawned by rank 0 on this machine (one device each)."""
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(levelname)s %(name)s (rank {rank}): %(message)s")
    world = join(rank, size, rank, backend, init_method)
    _serve_then_exit(world)


def run_from_env(config) -> int:
    """``loom serve|generate|bench`` on a rank > 0 under torchrun: the worker loop."""
    from loom.config import ConfigError
    from loom.plugin_manager import get_plugin_manager

    size = int(os.environ["WORLD_SIZE"])
    if config.tensor_parallel_size != size:
        raise ConfigError(f"config key 'tensor-parallel-size': {config.tensor_parallel_size}, "
                          f"but torchrun started {size} ranks (WORLD_SIZE); they must be equal")
    platform = get_plugin_manager().platform(config.platform)
    _serve_then_exit(from_env(platform.dist_backend))
    return 0


def _serve_then_exit(world: World) -> None:
    try:
        serve(world)
    except BaseException:
        logger.exception("loom: rank %d failed; leaving", world.rank)
        os._exit(1)       # no clean-up that could wait on the other ranks
    world.close()
