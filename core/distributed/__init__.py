"""Tensor parallelism over torch.distributed.

group.py     the tensor-parallel group the sharded layers talk through (all-reduce, all-gather)
world.py     the processes: spawned here, launched by torchrun, or already set up; the control
             channel rank 0 sends each step on; liveness of the other ranks
messages.py  the control messages: a SchedulerOutput encoded as plain data
executor.py  MultiprocExecutor: rank 0's side of every step
worker.py    the loop ranks 1..N-1 run: receive a step, run it on their shard
"""
