"""Rejection sampling of speculative tokens, statistically: on a 6-token vocabulary the tokens
it emits follow the target distribution (after temperature and top-k) at every verified
position, for drafts drawn from a different distribution q (draft model) and for deterministic
drafts (n-gram, the probability-1 rule). Chi-square tests with fixed seeds (deterministic, not
flaky), enough samples to detect a 2% shift; deliberately wrong rules fail the same tests.
"""
from __future__ import annotations

import pytest
import torch

from loom.sampler import SamplingRow
from loom.sampling_params import SamplingParams
from loom.spec_decode import rejection

VOCAB = 6
NUM = 40000                   # verifications per test
TEMPERATURE, TOP_K = 0.9, 5
LOGITS = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0, -2.0],      # position 0: after the last token
                       [0.1, 1.2, 0.3, -1.0, 0.6, 0.4],       # position 1: after draft 1
                       [-0.3, 0.0, 0.9, 0.2, 1.1, -0.4]])     # position 2: the bonus
DRAFT_Q = torch.tensor([[0.05, 0.30, 0.25, 0.10, 0.20, 0.10],
                        [0.40, 0.05, 0.05, 0.30, 0.10, 0.10]])


def target(logits: torch.Tensor) -> torch.Tensor:
    """What plain decoding samples from: temperature, then the top-k renormalized."""
    p = torch.softmax(logits / TEMPERATURE, dim=-1)
    p[p < p.topk(TOP_K).values[-1]] = 0
    return p / p.sum()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    if counts[~keep].sum() > 0:
        return 0.0                   # a token of probability 0 was emitted
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2), stat / 2).item()


def run(num: int, q: torch.Tensor | None, drafts: torch.Tensor | None = None,
        seeded: bool = False, seed: int = 0):
    """``num`` verifications of 2 drafts each; drafts drawn from ``q`` (or given). Returns the
    emitted token lists and the drafts."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if drafts is None:
        drafts = torch.stack([torch.multinomial(q[j], num, replacement=True, generator=gen)
                              for j in range(2)], dim=1)
    params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K)
    rows, seeds = [], []
    for i in range(num):
        generator = torch.Generator() if seeded else None
        for j in range(3):
            rows.append(SamplingRow(params, generator, [], [], frozenset(), j))
            seeds.append(hash((seed, i, j)) & ((1 << 63) - 1) if seeded else None)
    logits = LOGITS.repeat(num, 1)
    probs = None
    if q is not None:
        probs = torch.cat([q, torch.zeros(1, VOCAB)]).repeat(num, 1)
    out = rejection.verify(logits, rows, seeds, drafts.tolist(), probs)
    return out, drafts


def emitted_counts(out, position: int) -> torch.Tensor:
    tokens = [t[position] for t in out.token_ids if len(t) > position]
    return torch.bincount(torch.tensor(tokens), minlength=VOCAB).float()


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_emitted_tokens_follow_the_target_at_every_position(method):
    if method == "draft":
        out, drafts = run(NUM, DRAFT_Q)
    else:   # deterministic drafts, as an n-gram match proposes them: one-hot q
        fixed = torch.tensor([[0, 1]]).expand(NUM, 2)
        out, drafts = run(NUM, None, fixed)
    for position in range(3):
        counts = emitted_counts(out, position)
        p = target(LOGITS[position])
        assert counts.sum() > 5000
        assert chi_square_p_value(counts, p) > 1e-3, (position, counts / counts.sum(), p)
        # At the same level the samples reject a distribution 2% (total variation) away.
        shifted = p.clone()
        shifted[p.argmax()] -= 0.02
        shifted[torch.where(p > 0, p, 1).argmin()] += 0.02
        assert chi_square_p_value(counts, shifted) < 1e-3
    # The first draft is accepted with probability sum(min(p, q)) (q one-hot: p(draft)).
    p0 = target(LOGITS[0])
    q0 = DRAFT_Q[0] if method == "draft" else torch.nn.functional.one_hot(
        torch.tensor(0), VOCAB).float()
    accepted = sum(1 for n in out.num_accepted if n >= 1) / NUM
    assert accepted == pytest.approx(torch.minimum(p0, q0).sum().item(), abs=0.01)


def test_seeded_rows_follow_the_target_and_repeat():
    out, drafts = run(12000, DRAFT_Q, seeded=True, seed=3)
    for position in range(2):
        counts = emitted_counts(out, position)
        assert chi_square_p_value(counts, target(LOGITS[position])) > 1e-3
    again, _ = run(12000, DRAFT_Q, drafts=drafts, seeded=True, seed=3)
    assert again.token_ids == out.token_ids       # a function of the seeds alone


@pytest.mark.parametrize("wrong_rule", ["accept_always", "resample_from_target"])
def test_a_wrong_rule_fails_the_same_test(monkeypatch, wrong_rule):
    right = rejection.speculative_draw

    def accept_always(probs, draft, q, randomness):
        tokens, _ = right(probs, draft, q, randomness)
        return tokens, draft >= 0

    def resample_from_target(probs, draft, q, randomness):
        """Accept with min(1, p/q), but on rejection draw from p instead of max(p - q, 0)."""
        _, accepted = right(probs, draft, q, randomness)
        tokens, _ = right(probs, torch.full_like(draft, -1), None, randomness)
        return tokens, accepted

    monkeypatch.setattr(rejection, "speculative_draw", locals()[wrong_rule])
    out, _ = run(NUM, DRAFT_Q)
    counts = emitted_counts(out, 0)
    assert chi_square_p_value(counts, target(LOGITS[0])) < 1e-6


def test_greedy_rows_accept_exactly_the_argmax():
    logits = torch.randn(7, 10, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1).tolist()
    params = SamplingParams(temperature=0)
    rows = [SamplingRow(params, None, [], [], frozenset(), j) for j in (0, 1, 2, 0, 1, 2, 0)]
    # One request with a right then a wrong draft, one with two right ones, one with none.
    drafts = [[best[0], (best[1] + 1) % 10], [best[3], best[4]], []]
    out = rejection.verify(logits, rows, [None] * 7, drafts)
    assert out.token_ids == [[best[0], best[1]], [best[3], best[4], best[5]], [best[6]]]
    assert out.num_accepted == [1, 2, 0]
