"""A model-free runner for scheduler tests: keeps request state from the scheduler's deltas the
way ModelRunner does, checks what it is fed, and 'samples' a deterministic function of the
sequence so far (so preemption or chunking cannot change the outcome unnoticed)."""
from __future__ import annotations

from loom.scheduler_output import ModelRunnerOutput, SchedulerOutput

VOCAB = 1000


def next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 7) for i, t in enumerate(tokens)) * 2654435761) % VOCAB


class FakeRunner:
    def __init__(self, block_size: int, num_blocks: int):
        self.block_size = block_size
        self.tokens: dict[str, list[int]] = {}
        self.blocks: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.slots_owner: dict[int, tuple[str, int]] = {}   # slot -> (request, position)
        self.num_blocks = num_blocks

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        for rid in sched.finished_req_ids:
            self.tokens.pop(rid, None)
            self.blocks.pop(rid, None)
        for new in sched.new_requests:
            self.tokens[new.req_id] = new.prompt_token_ids + new.output_token_ids
            self.blocks[new.req_id] = list(new.block_ids)
            self.computed[new.req_id] = new.num_computed_tokens
        for c in sched.cached_requests:
            self.tokens[c.req_id].extend(c.new_token_ids)
            self.blocks[c.req_id].extend(c.new_block_ids)
            assert c.num_computed_tokens == self.computed[c.req_id]
        out = ModelRunnerOutput()
        assert sum(sched.num_scheduled_tokens.values()) == sched.total_num_scheduled_tokens
        for rid, n in sched.num_scheduled_tokens.items():
            start = self.computed[rid]
            end = start + n
            toks = self.tokens[rid]
            assert end <= len(toks), (rid, start, n, len(toks))
            assert len(self.blocks[rid]) * self.block_size >= end
            for b in self.blocks[rid]:
                assert 0 <= b < self.num_blocks
            self.computed[rid] = end
            if end == len(toks):
                out.req_ids.append(rid)
                out.sampled_token_ids.append([next_token(toks)])
        out.logprobs = [None] * len(out.req_ids)
        return out
