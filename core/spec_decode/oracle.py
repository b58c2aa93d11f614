"""Oracle proposer, for benchmarks only: it proposes the target's own greedy continuation, each
token deliberately wrong with probability 1 - acceptance-rate, so the verification machinery
can be timed at a chosen acceptance whatever the weights (random ones accept nothing else).

The continuation of a prompt comes from a plain greedy run recorded beforehand (``remember``;
``record_greedy`` runs it through an engine). A request whose output has left the recorded
continuation, or has run past its end, gets no proposals. The errors are a deterministic
function of (seed, prompt, output index): reruns propose the same tokens.

With ``force-path`` (benchmarks of the machinery on random weights, where bf16 near-ties make a
verification step leave the recorded path often) each verification emits the recorded path
itself: the drafts up to the first wrong one, then the path's next token. The target's own
choice is still computed and verified against, then discarded, so a step costs what a real one
does and the acceptance is exactly the one set.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loom.spec_decode.proposer import ProposalRequest, Proposals, Proposer

MASK64 = (1 << 64) - 1


@dataclass
class _Track:
    key: int                       # hash of the prompt
    continuation: list[int] | None
    checked: int = 0               # outputs found equal to the continuation so far


class OracleProposer(Proposer):
    method = "oracle"

    def __init__(self, num_speculative_tokens: int, acceptance_rate: float, seed: int,
                 vocab_size: int, force_path: bool = False):
        super().__init__(num_speculative_tokens)
        self.acceptance_rate = acceptance_rate     # may be changed between runs
        self.seed = seed
        self.vocab_size = vocab_size
        self.continuations: dict[tuple[int, ...], list[int]] = {}
        self.tracks: dict[str, _Track] = {}
        self.num_off_path = 0                      # proposals skipped: output left the record
        self.force_path = force_path

    def remember(self, prompt_token_ids: list[int], continuation: list[int]) -> None:
        self.continuations[tuple(prompt_token_ids)] = list(continuation)

    def propose(self, requests: list[ProposalRequest]) -> Proposals:
        return Proposals([self._propose(req) for req in requests])

    def _track(self, req_id: str, prompt: Sequence[int]) -> _Track:
        track = self.tracks.get(req_id)
        if track is None:
            prompt = tuple(prompt)
            track = _Track(hash(prompt) & MASK64, self.continuations.get(prompt))
            self.tracks[req_id] = track
        return track

    def _propose(self, req: ProposalRequest) -> list[int]:
        track = self._track(req.req_id, req.token_ids[:req.num_prompt_tokens])
        cont = track.continuation
        num_out = req.num_output_tokens
        if cont is None:
            return []
        outputs = req.tail(req.num_prompt_tokens + track.checked)
        if outputs != cont[track.checked:num_out]:
            self.num_off_path += 1
            return []
        track.checked = num_out
        proposal = np.array(cont[num_out:num_out + min(self.k, req.max_proposals)],
                            dtype=np.int64)
        if len(proposal):
            proposal = self._corrupt(proposal, track.key, num_out)
        return proposal.tolist()

    def _corrupt(self, tokens: np.ndarray, key: int, first: int) -> np.ndarray:
        """Each token replaced by another with probability 1 - acceptance_rate."""
        index = np.arange(first, first + len(tokens), dtype=np.uint64)
        base = np.uint64((key * 0x9E3779B97F4A7C15 + self.seed) & MASK64)
        draw = _splitmix64(index ^ base)
        wrong = (draw >> np.uint64(11)).astype(np.float64) / float(1 << 53) >= self.acceptance_rate
        shift = 1 + (_splitmix64(draw) % np.uint64(self.vocab_size - 1)).astype(np.int64)
        return np.where(wrong, (tokens + shift) % self.vocab_size, tokens)

    def forced_tokens(self, req_id: str, prompt: Sequence[int], num_out: int,
                      drafts: list[int]) -> list[int] | None:
        """With force-path, what this request's verification emits after its ``num_out``
        outputs: the recorded path's drafts up to the first wrong one, then the path's next
        token. None without force-path or off the record."""
        if not self.force_path:
            return None
        cont = self._track(req_id, prompt).continuation
        if cont is None or num_out >= len(cont):
            return None
        accepted = 0
        while (accepted < len(drafts) and num_out + accepted + 1 < len(cont)
               and drafts[accepted] == cont[num_out + accepted]):
            accepted += 1
        return cont[num_out:num_out + accepted + 1]

    def drop(self, req_id: str) -> None:
        self.tracks.pop(req_id, None)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each element (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def record_greedy(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids) by ``engine`` with speculation off,
    remembered by its oracle proposer (if it has one); returns them."""
    from loom.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    runner = engine.executor.runner
    proposer, runner.proposing = runner.proposer, False
    try:
        ids = [engine.add_request(list(p), params) for p in prompts]
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
    finally:
        runner.proposing = True
    continuations = [done[i] for i in ids]
    if isinstance(proposer, OracleProposer):
        for prompt, cont in zip(prompts, continuations):
            proposer.remember(prompt, cont)
    return continuations
