"""N-gram (prompt lookup) proposer: the longest suffix n-gram of a request's tokens that also
occurs earlier in its prompt or output proposes the k tokens that followed that occurrence.

Each request's tokens live in a numpy buffer that grows by what each step appends; the search
is a handful of vectorized comparisons per request, no Python loop over tokens.
"""
from __future__ import annotations

import numpy as np

from loom.spec_decode.proposer import ProposalRequest, Proposals, Proposer


def lookup(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> np.ndarray:
    """The up to ``k`` tokens that followed the earliest occurrence of the longest suffix
    n-gram (min_n <= n <= max_n) of ``tokens`` found earlier in ``tokens``; empty if none."""
    num = len(tokens)
    max_n = min(max_n, num - 1)
    if max_n < min_n or k <= 0:
        return tokens[:0]
    # Candidates: where an earlier occurrence could end (its last token is the last token).
    ends = np.flatnonzero(tokens[:num - 1] == tokens[num - 1])
    ends = ends[ends >= min_n - 1]
    if not len(ends):
        return tokens[:0]
    back = np.arange(max_n)
    earlier = ends[:, None] - back                     # [candidates, max_n]
    suffix = tokens[num - 1 - back]
    same = (earlier >= 0) & (tokens[np.maximum(earlier, 0)] == suffix)
    lengths = np.cumprod(same, axis=1).sum(axis=1)     # matched suffix length per candidate
    best = lengths.max()
    if best < min_n:
        return tokens[:0]
    end = ends[np.argmax(lengths == best)]             # the earliest of the longest
    return tokens[end + 1:end + 1 + k]


class TokenBuffer:
    """A request's tokens as a growing int64 array."""

    def __init__(self):
        self.data = np.zeros(64, dtype=np.int64)
        self.size = 0

    def extend(self, tokens: list[int]) -> None:
        need = self.size + len(tokens)
        if need > len(self.data):
            grown = np.zeros(max(need, 2 * len(self.data)), dtype=np.int64)
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        self.data[self.size:need] = tokens
        self.size = need

    @property
    def tokens(self) -> np.ndarray:
        return self.data[:self.size]


class NgramProposer(Proposer):
    method = "ngram"

    def __init__(self, num_speculative_tokens: int, min_n: int, max_n: int):
        super().__init__(num_speculative_tokens)
        self.min_n, self.max_n = min_n, max_n
        self.buffers: dict[str, TokenBuffer] = {}

    def propose(self, requests: list[ProposalRequest]) -> Proposals:
        out = []
        for req in requests:
            buffer = self.buffers.setdefault(req.req_id, TokenBuffer())
            buffer.size = min(buffer.size, req.num_tokens)
            buffer.extend(req.tail(buffer.size))
            k = min(self.k, req.max_proposals)
            out.append(lookup(buffer.tokens, k, self.min_n, self.max_n).tolist())
        return Proposals(out)

    def drop(self, req_id: str) -> None:
        self.buffers.pop(req_id, None)
