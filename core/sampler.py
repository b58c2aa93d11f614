"""Sampler: one token per sequence from its logits row.

Pipeline, in float32: penalties -> min_tokens mask -> greedy argmax, or temperature -> top-k ->
top-p -> min-p -> exponential-race draw. Logprobs are of the raw logits, before any of that.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loom.sampling_params import SamplingParams
from loom.scheduler_output import TokenLogprobs


class TokenSpan(Sequence):
    """tokens[start:end] without copying (copied only if penalties need the ids)."""
    __slots__ = ("tokens", "start", "end")

    def __init__(self, tokens: list[int], start: int, end: int):
        self.tokens, self.start, self.end = tokens, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i):
        return self.tokens[self.start:self.end][i]

    def __iter__(self):
        return iter(self.tokens[self.start:self.end])


@dataclass
class SamplingRow:
    """One sequence that samples this step."""
    params: SamplingParams
    generator: torch.Generator | None   # set iff the request has a seed; on the logits' device
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]     # generated so far (known to the host)
    eos_token_ids: frozenset[int]
    num_output_tokens: int | None = None  # generated so far, counting one still on the device

    @property
    def blocked_token_ids(self) -> list[int]:
        """Stop ids masked this step because min_tokens is not reached yet."""
        done = (len(self.output_token_ids) if self.num_output_tokens is None
                else self.num_output_tokens)
        if done >= self.params.min_tokens:
            return []
        return sorted(self.eos_token_ids | set(self.params.stop_token_ids))

    @property
    def is_plain_greedy(self) -> bool:
        p = self.params
        return p.plain_greedy or (p.greedy and not p.needs_penalties and p.logprobs is None
                                  and not self.blocked_token_ids)


@dataclass
class LogprobTensors:
    """Logprobs of the rows that asked for them, still on the device."""
    rows: list[int]
    sampled: torch.Tensor         # [r] logprob of the sampled token
    ranks: torch.Tensor           # [r] its rank, 1 = most likely
    top_ids: torch.Tensor         # [r, N]
    top_logprobs: torch.Tensor    # [r, N]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor               # [n] int64, on the logits' device
    logprobs: LogprobTensors | None = None

    def tensors(self) -> list[torch.Tensor]:
        lp = self.logprobs
        extra = [] if lp is None else [lp.sampled, lp.ranks, lp.top_ids, lp.top_logprobs]
        return [self.token_ids] + extra

    def with_tensors(self, tensors: list[torch.Tensor]) -> "SamplerOutput":
        """The same output over other copies of its tensors (e.g. host copies)."""
        lp = self.logprobs
        if lp is None:
            return SamplerOutput(tensors[0])
        return SamplerOutput(tensors[0], LogprobTensors(lp.rows, *tensors[1:]))

    def to_lists(self, rows: list[SamplingRow]
                 ) -> tuple[list[int], list[list[TokenLogprobs] | None]]:
        tokens = self.token_ids.tolist()
        out: list[list[TokenLogprobs] | None] = [None] * len(tokens)
        lp = self.logprobs
        if lp is not None:
            sampled, ranks = lp.sampled.tolist(), lp.ranks.tolist()
            top_ids, top_logprobs = lp.top_ids.tolist(), lp.top_logprobs.tolist()
            for j, i in enumerate(lp.rows):
                n = rows[i].params.logprobs
                out[i] = [TokenLogprobs(tokens[i], sampled[j], ranks[j], top_ids[j][:n],
                                        top_logprobs[j][:n])]
        return tokens, out


class Sampler:

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]
                 ) -> tuple[list[int], list[list[TokenLogprobs] | None]]:
        return self.forward(logits, rows).to_lists(rows)

    def forward(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """Sample on the device; nothing here waits for the device."""
        assert logits.dim() == 2 and logits.size(0) == len(rows)
        if all(row.is_plain_greedy for row in rows):
            return SamplerOutput(argmax(logits))
        x = logits.to(torch.float32, copy=True)
        apply_penalties(x, rows)
        apply_min_tokens(x, rows)
        tokens = argmax(x)
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            index = _index(x, sampled)
            tokens[index] = sample(x[index], [rows[i] for i in sampled])
        return SamplerOutput(tokens, compute_logprobs(logits, tokens, rows))


ARGMAX_SLICE = 128


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of rows [B, V], the first index of the largest value, in two passes when V
    splits into slices of ARGMAX_SLICE: each slice's max, then the best slice. A few rows
    otherwise leave most of a GPU idle in one long reduction (36 us a step for one row of
    128,256 logits on the H200, decode profile run 39)."""
    b, v = x.shape
    if v % ARGMAX_SLICE or v < 16 * ARGMAX_SLICE:
        return x.argmax(dim=-1)
    values, index = x.view(b, v // ARGMAX_SLICE, ARGMAX_SLICE).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)
    return (best * ARGMAX_SLICE + index.gather(1, best)).squeeze(1)


def sample(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then a draw. ``x`` is float32 and is modified."""
    return exponential_race(processed_probs(x, rows), [row.generator for row in rows])


def processed_probs(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The distribution a row samples from: temperature, top-k, top-p, then min-p; rows sum
    to 1 except after min-p, which zeroes entries without renormalizing. ``x`` is float32
    logits (penalties applied) and is modified."""
    temperature = _column(x, [row.params.temperature for row in rows])
    x.div_(temperature)
    top_k = [row.params.top_k for row in rows]
    top_p = [row.params.top_p for row in rows]
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
        apply_top_k_top_p(x, top_k, top_p)
    probs = x.softmax(dim=-1)
    min_p = [row.params.min_p for row in rows]
    if any(p > 0 for p in min_p):
        apply_min_p(probs, min_p)
    return probs


def apply_penalties(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition (HF/vLLM: prompt + output) then frequency and presence (OpenAI: output only)."""
    picked = [i for i, row in enumerate(rows) if row.params.needs_penalties]
    if not picked:
        return
    rows = [rows[i] for i in picked]
    index = _index(x, picked)
    vocab = x.size(1)
    logits = x[index]
    output_counts = _token_counts([row.output_token_ids for row in rows], vocab, x.device)
    prompt_counts = _token_counts([row.prompt_token_ids for row in rows], vocab, x.device)
    seen = (prompt_counts > 0) | (output_counts > 0)
    repetition = _column(x, [row.params.repetition_penalty for row in rows])
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    logits -= _column(x, [row.params.frequency_penalty for row in rows]) * output_counts
    logits -= _column(x, [row.params.presence_penalty for row in rows]) * (output_counts > 0)
    x[index] = logits


def apply_min_tokens(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Mask eos and stop_token_ids of rows that have not produced min_tokens yet."""
    row_ids, token_ids = [], []
    for i, row in enumerate(rows):
        blocked = [t for t in row.blocked_token_ids if t < x.size(1)]
        row_ids += [i] * len(blocked)
        token_ids += blocked
    if row_ids:
        x[_index(x, row_ids), _index(x, token_ids)] = -torch.inf


def apply_top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    """Top-k (0: off) then top-p on the renormalized top-k distribution; in place on logits."""
    vocab = x.size(1)
    x_sorted, order = x.sort(dim=-1, descending=True, stable=True)
    k = _column(x, [k if 0 < k < vocab else vocab for k in top_k], torch.long)
    position = torch.arange(vocab, device=x.device)
    drop = position >= k
    probs = x_sorted.masked_fill(drop, -torch.inf).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1).roll(1, dims=-1)  # mass of the more likely tokens
    mass_before[:, 0] = 0                                 # the top token always stays
    p = _column(x, top_p)
    drop |= (mass_before >= p) & (p < 1)
    x.masked_fill_(drop.scatter(1, order, drop), -torch.inf)


def apply_min_p(probs: torch.Tensor, min_p: list[float]) -> None:
    """Zero tokens whose prob is below min_p times the row's largest prob; in place."""
    threshold = _column(probs, min_p) * probs.amax(dim=-1, keepdim=True)
    probs.masked_fill_(probs < threshold, 0)


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]
                     ) -> torch.Tensor:
    """argmax(probs / q), q ~ Exp(1): a draw from probs (unnormalized is fine). A seeded row
    takes exactly one Exp(1) per vocab entry from its own generator, whatever the batch."""
    q = torch.empty_like(probs).exponential_()
    for i, generator in enumerate(generators):
        if generator is not None:
            q[i].exponential_(generator=generator)
    q.clamp_min_(torch.finfo(q.dtype).tiny)              # Exp(1) may round to 0
    return (probs / q).argmax(dim=-1)


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow]
                     ) -> LogprobTensors | None:
    """Raw-distribution logprobs of the sampled token (with its rank) and the top-N."""
    picked = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not picked:
        return None
    index = _index(logits, picked)
    logprobs = logits[index].float().log_softmax(dim=-1)
    sampled = logprobs.gather(1, tokens[index].unsqueeze(1))
    ranks = (logprobs > sampled).sum(dim=-1) + 1
    num_top = max(rows[i].params.logprobs for i in picked)
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
    return LogprobTensors(picked, sampled.squeeze(1), ranks, top_ids, top_logprobs)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device without waiting for the device (pinned, asynchronous copy)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _index(like: torch.Tensor, values: list[int]) -> torch.Tensor:
    return to_device(values, torch.long, like.device)


def _column(like: torch.Tensor, values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return to_device(values, dtype, like.device).unsqueeze(1)


def _token_counts(seqs: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), vocab] float32 occurrence counts; ids outside the vocab are ignored."""
    width = max(map(len, seqs))
    padded = [list(seq) + [vocab] * (width - len(seq)) for seq in seqs]
    ids = to_device(padded, torch.long, device)
    ids = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
    counts = torch.zeros(len(seqs), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]
