"""What crosses from the scheduler to the executor each step, and back: plain data only."""
from __future__ import annotations

from dataclasses import dataclass, field

from loom.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (or is seeing again after a preemption)."""
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int | None
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the runner already holds: what changed since it last ran."""
    req_id: str
    new_token_ids: list[int]      # tokens appended to the request since the runner saw it
    new_block_ids: list[int]      # blocks appended to its block table
    num_computed_tokens: int
    num_kept_blocks: int | None = None   # its table's first blocks kept (speculative decoding
                                         # frees rejected tokens' blocks); None: all


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_req_ids: set[str] = field(default_factory=set)  # the runner drops their state
    # Drafts to verify, the last tokens of a request's scheduled ones (speculative decoding).
    scheduled_spec_tokens: dict[str, list[int]] = field(default_factory=dict)
    # Requests whose next step decodes without drafts (draft backoff): no proposals for them.
    backoff_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class TokenLogprobs:
    """Logprobs at one generated position: the sampled token's and the top-N."""
    sampled_token_id: int
    sampled_logprob: float
    sampled_rank: int                      # 1 = most likely
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    req_ids: list[str] = field(default_factory=list)            # requests that sampled
    # Per request the tokens it emitted: one, or with drafts the accepted ones and one more.
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[TokenLogprobs] | None] = field(default_factory=list)
    spec_token_ids: list[list[int]] | None = None    # proposals for the next step
