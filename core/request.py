"""Request: the engine's state for one sequence being generated."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from loom.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    """One sequence. It catches ``num_computed_tokens`` up to ``num_tokens`` step by step: a
    prompt chunk, a prefix-cache hit, a decode and a resumed preemption are all that one rule."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    max_tokens: int = 16                 # resolved against max-model-len at admission
    seed: int | None = None              # this sequence's seed (parent seed + index for n > 1)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0           # prompt tokens served from the prefix cache
    num_output_placeholders: int = 0     # tokens sampled on the device, not yet seen here
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    block_hashes: list[int] = field(default_factory=list)  # hash chain over full blocks
    spec_token_ids: list[int] = field(default_factory=list)  # drafts to verify next step
    num_draft_tokens: int = 0            # drafts verified for it so far
    num_missed_drafts: int = 0           # verifications in a row that accepted no draft
    draft_backoff: int = 0               # steps left without drafts (see draft_backoff())
    num_accepted_tokens: int = 0         # of which accepted

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.finished else None
