"""What rank 0 sends the other ranks on the control channel: a kind and a payload of bytes.

A step's SchedulerOutput is encoded as plain values with ``marshal`` (the standard library's
serializer of builtin types: no classes named, nothing executed on decoding), token and block
ids as packed int32 arrays; only what changed since the last step is in it. The session spec
(config and resolved plugin classes) is pickled once per engine, at start.
"""
from __future__ import annotations

import dataclasses
import marshal
from array import array

from loom.sampling_params import SamplingParams
from loom.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

SESSION = 1     # payload: the pickled RunnerSpec of a new engine
STEP = 2        # payload: encode_step(SchedulerOutput)
END = 3         # the engine shut down; wait for the next session
EXIT = 4        # leave the worker loop

_PARAMS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _ids(values: list[int]) -> bytes:
    return array("i", values).tobytes()


def _list(data: bytes) -> list[int]:
    ids = array("i")
    ids.frombytes(data)
    return ids.tolist()


def encode_step(sched: SchedulerOutput) -> bytes:
    new = [(r.req_id, _ids(r.prompt_token_ids), _ids(r.output_token_ids),
            tuple(getattr(r.sampling_params, name) for name in _PARAMS), r.seed,
            _ids(r.block_ids), r.num_computed_tokens) for r in sched.new_requests]
    cached = [(c.req_id, _ids(c.new_token_ids), _ids(c.new_block_ids), c.num_computed_tokens)
              for c in sched.cached_requests]
    return marshal.dumps((new, cached, sched.num_scheduled_tokens,
                          sched.total_num_scheduled_tokens, sched.finished_req_ids))


def decode_step(data: bytes) -> SchedulerOutput:
    new, cached, counts, total, finished = marshal.loads(data)
    return SchedulerOutput(
        new_requests=[NewRequestData(rid, _list(prompt), _list(output),
                                     SamplingParams(**dict(zip(_PARAMS, params))), seed,
                                     _list(blocks), computed)
                      for rid, prompt, output, params, seed, blocks, computed in new],
        cached_requests=[CachedRequestData(rid, _list(tokens), _list(blocks), computed)
                         for rid, tokens, blocks, computed in cached],
        num_scheduled_tokens=counts, total_num_scheduled_tokens=total,
        finished_req_ids=finished)
