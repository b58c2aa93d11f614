"""Verification of speculative tokens: which drafts the target accepts, and the token after them.

A request with d drafts brings d + 1 target positions: position j holds the target's logits
for the token after draft j (position 0: after the last verified token). Each position gets the
processing plain decoding would give it (penalties counting the drafts before it as outputs,
min_tokens, temperature, top-k, top-p, min-p), so the emitted tokens are what plain decoding
would emit under greedy, and follow its distribution under sampling:

- greedy: a draft is accepted iff it is the argmax; the first mismatch emits the argmax.
- sampling (Leviathan et al. 2023): draft x, drawn from q, is accepted with probability
  min(1, p(x) / q(x)); the first rejection emits a token drawn from max(p - q, 0) normalized.
  Proposers without a distribution (n-gram, oracle) propose x with probability 1: q is one-hot,
  so x is accepted with probability p(x) and a rejection draws from p with x removed.
- all drafts accepted: a bonus token is drawn from the last position's p.

Randomness of a seeded request is a function of (seed, output index): one uniform for the
acceptance test, then one Exp(1) per vocab entry for the draw, whatever the batch.

``verify_on_device`` leaves the outcome on the device (``Verdict``): a step without drafts
samples through it too, so its tokens are drawn exactly as in any other step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loom.sampler import (LogprobTensors, SamplerOutput, SamplingRow, apply_min_tokens,
                          apply_penalties, compute_logprobs, processed_probs, to_device)
from loom.scheduler_output import TokenLogprobs


@dataclass
class Verified:
    """Per request: the accepted drafts followed by one more token, and their logprobs."""
    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]
    num_accepted: list[int]


@dataclass
class Verdict:
    """The outcome per position, still on the device."""
    target: torch.Tensor            # [P] the token emitted if the position is reached and its
                                    # draft (if any) rejected
    accept: torch.Tensor            # [P] bool: its draft is accepted
    chosen: torch.Tensor | None     # [P] the token it ends with (None: every row plain greedy)
    logprobs: LogprobTensors | None

    def to_host(self, rows: list[SamplingRow] | None, drafts: list[list[int]]) -> Verified:
        """Per request its accepted drafts and the token after them (waits for the device)."""
        return _per_request(self.target, self.accept, self.chosen, self.logprobs, rows, drafts,
                            _starts(drafts))


def verify(logits: torch.Tensor, rows: list[SamplingRow] | None, seeds: list[int | None] | None,
           drafts: list[list[int]], draft_probs: torch.Tensor | None = None) -> Verified:
    """``logits`` [P, V]: the positions of every request in turn (len(drafts[r]) + 1 each);
    ``rows`` and ``seeds``: per position (None: every request is plain greedy);
    ``draft_probs`` [P, V]: at draft positions, the distribution each draft was drawn from
    (None: every proposal was deterministic)."""
    return verify_on_device(logits, rows, seeds, drafts, draft_probs).to_host(rows, drafts)


def verify_on_device(logits: torch.Tensor, rows: list[SamplingRow] | None,
                     seeds: list[int | None] | None, drafts: list[list[int]],
                     draft_probs: torch.Tensor | None = None) -> Verdict:
    """verify() without waiting for the device."""
    starts = _starts(drafts)
    num_positions = sum(len(d) + 1 for d in drafts)
    assert logits.size(0) == num_positions
    assert rows is None or len(rows) == len(seeds) == num_positions
    greedy = rows is None or all(row.is_plain_greedy for row in rows)
    if greedy and not any(drafts):                  # nothing to verify: plain greedy decoding
        target = logits.argmax(dim=-1)
        return Verdict(target, torch.zeros_like(target, dtype=torch.bool), None, None)
    draft_at = np.full(num_positions, -1, dtype=np.int64)   # the draft each position checks
    for start, tokens in zip(starts, drafts):
        draft_at[start:start + len(tokens)] = tokens
    draft_tok = to_device(draft_at.tolist(), torch.long, logits.device)
    logprobs = chosen = None
    if greedy:
        target = logits.argmax(dim=-1)
        accept = draft_tok == target
    else:
        x = logits.to(torch.float32, copy=True)
        apply_penalties(x, rows)
        apply_min_tokens(x, rows)
        target = x.argmax(dim=-1)
        accept = draft_tok == target
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            index = to_device(sampled, torch.long, x.device)
            probs = processed_probs(x[index], [rows[i] for i in sampled])
            probs /= probs.sum(dim=-1, keepdim=True)
            q = None if draft_probs is None else draft_probs[index].float()
            tokens, accepted = speculative_draw(
                probs, draft_tok[index], q, [(rows[i].generator, seeds[i]) for i in sampled])
            target[index] = tokens
            accept[index] = accepted
        chosen = torch.where(accept, draft_tok, target)
        logprobs = compute_logprobs(logits, chosen, rows)
    return Verdict(target, accept, chosen, logprobs)


def _starts(drafts: list[list[int]]) -> list[int]:
    """Each request's first position: requests bring len(drafts) + 1 positions each."""
    starts = [0] * len(drafts)
    for i in range(1, len(drafts)):
        starts[i] = starts[i - 1] + len(drafts[i - 1]) + 1
    return starts


def speculative_draw(probs: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None,
                     randomness: list[tuple[torch.Generator | None, int | None]]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One position each: (the token emitted if this position is reached and its draft, if
    any, is rejected; whether the draft is accepted). ``probs`` [S, V] normalized target
    distributions; ``draft`` [S] the drafts (-1: none, a bonus position); ``q`` [S, V] their
    draft distributions (None: one-hot, a deterministic proposal)."""
    has_draft = draft >= 0
    x = draft.clamp(min=0).unsqueeze(1)
    p_x = probs.gather(1, x).squeeze(1)
    if q is None:
        q_x = torch.ones_like(p_x)
        residual = torch.where(has_draft.unsqueeze(1), probs.scatter(1, x, 0.0), probs)
    else:
        q = q * has_draft.unsqueeze(1)                   # a bonus position draws from p
        q_x = q.gather(1, x).squeeze(1)
        residual = (probs - q).clamp_min_(0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0      # p == q: rejection cannot happen
    residual = torch.where(empty, probs, residual)
    uniform, noise = _draws(probs, randomness)
    accepted = has_draft & (uniform * q_x < p_x)
    return (residual / noise).argmax(dim=-1), accepted


def _draws(like: torch.Tensor, randomness) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row a uniform in [0, 1) and Exp(1) noise over the vocab; a seeded row reseeds its
    generator first and draws both from it."""
    uniform = torch.rand(like.size(0), device=like.device)
    noise = torch.empty_like(like).exponential_()
    for i, (generator, seed) in enumerate(randomness):
        if generator is not None:
            generator.manual_seed(seed)
            uniform[i] = torch.rand((), generator=generator, device=like.device)
            noise[i].exponential_(generator=generator)
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return uniform, noise


def _per_request(target, accept, chosen, logprobs, rows, drafts, starts) -> Verified:
    target_host, accept_host = torch.stack((target, accept.to(target.dtype))).tolist()  # 1 sync
    per_position = None
    if logprobs is not None:     # of the token each position ends with: its draft if accepted
        _, per_position = SamplerOutput(chosen, logprobs).to_lists(rows)
    out = Verified([], [], [])
    for start, tokens in zip(starts, drafts):
        num = 0
        while num < len(tokens) and accept_host[start + num]:
            num += 1
        out.token_ids.append(tokens[:num] + [target_host[start + num]])
        out.num_accepted.append(num)
        if per_position is None or per_position[start] is None:
            out.logprobs.append(None)
        else:
            out.logprobs.append([per_position[start + j][0] for j in range(num + 1)])
    return out
