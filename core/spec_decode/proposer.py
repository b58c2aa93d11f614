"""The Proposer interface: what the model runner asks of every speculative method.

After each step the runner hands the proposer the requests that sampled, with the tokens they
emitted, but for those whose next step decodes without drafts (draft backoff); the proposer
guesses up to k next tokens for each. The scheduler schedules them as
extra tokens of the request in the next step, where the target verifies them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loom.sampling_params import SamplingParams


@dataclass
class ProposalRequest:
    """One request that sampled this step."""
    req_id: str
    token_ids: list[int]          # prompt and outputs known before this step (not copied)
    new_token_ids: list[int]      # emitted by this step: accepted drafts, then one more
    num_prompt_tokens: int
    max_proposals: int            # room left before max-model-len
    params: SamplingParams
    seed: int | None = None
    generator: torch.Generator | None = None
    block_ids: list[int] = field(default_factory=list)   # its KV blocks (the target's table)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + len(self.new_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    def tail(self, start: int) -> list[int]:
        """All tokens from index ``start`` on (prompt, outputs and this step's)."""
        known = len(self.token_ids)
        if start >= known:
            return self.new_token_ids[start - known:]
        return self.token_ids[start:] + self.new_token_ids


@dataclass
class Proposals:
    token_ids: list[list[int]]                    # per request, at most k
    # Per request, the distributions its tokens were drawn from ([len, vocab]), or None where
    # the proposal is deterministic (then verification treats it as one-hot).
    probs: list[torch.Tensor | None] | None = None


class Proposer:
    method: str = ""
    num_lookahead_tokens: int = 0   # KV slots past a step's tokens that propose() writes

    def __init__(self, num_speculative_tokens: int):
        self.k = num_speculative_tokens

    def propose(self, requests: list[ProposalRequest]) -> Proposals:
        raise NotImplementedError

    def observe(self, batch, prev_sampled) -> None:
        """Called every step after the target's forward over ``batch`` (a HostBatch), whose
        placeholders read the previous step's tokens ``prev_sampled`` (on the device)."""

    def drop(self, req_id: str) -> None:
        """The runner forgot a request (finished or preempted)."""

    # A proposer with its own model keeps a KV cache next to the target's, block for block.
    def kv_block_bytes(self) -> int:
        return 0

    def allocate_kv_cache(self, num_blocks: int) -> None:
        pass

    def capture_graphs(self) -> None:
        pass

    def profile_run(self) -> None:
        pass
