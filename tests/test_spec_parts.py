"""The parts of speculative decoding without a model: the n-gram lookup against a brute-force
search, the oracle's error rate, the scheduler's draft scheduling and rollback, the metrics."""
from __future__ import annotations

import numpy as np
import pytest

from loom.kv_cache import KVCacheManager
from loom.request import Request, RequestStatus
from loom.sampling_params import SamplingParams
from loom.scheduler import Scheduler
from loom.scheduler_output import ModelRunnerOutput
from loom.spec_decode.ngram import NgramProposer, lookup
from loom.spec_decode.oracle import OracleProposer
from loom.spec_decode.proposer import ProposalRequest
from loom.spec_decode.stats import SpecDecodeStats


# ---- n-gram lookup ------------------------------------------------------------------------------
def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The longest suffix n-gram, at its earliest earlier occurrence: what followed it."""
    num = len(tokens)
    for size in range(min(max_n, num - 1), min_n - 1, -1):
        for start in range(num - size):
            if tokens[start:start + size] == tokens[num - size:]:
                return tokens[start + size:start + size + k]
    return []


def test_lookup_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        tokens = rng.integers(0, rng.integers(2, 5), size=rng.integers(1, 40)).tolist()
        k, low = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        high = low + int(rng.integers(0, 4))
        got = lookup(np.array(tokens, dtype=np.int64), k, low, high).tolist()
        assert got == brute_force(tokens, k, low, high), (tokens, k, low, high)


def test_lookup_examples():
    seq = np.array([1, 2, 3, 4, 2, 3], dtype=np.int64)
    assert lookup(seq, 4, 2, 2).tolist() == [4, 2, 3]      # [2, 3] seen before: what followed
    assert lookup(seq, 4, 3, 3).tolist() == []              # [4, 2, 3] was not
    assert lookup(np.array([5, 5, 5, 5]), 3, 1, 2).tolist() == [5, 5]


def test_ngram_proposer_follows_each_requests_tokens():
    proposer = NgramProposer(3, 2, 4)
    prompt = [7, 8, 9, 10, 11, 7, 8]
    req = ProposalRequest("a", list(prompt), [9], len(prompt), 10, SamplingParams())
    assert proposer.propose([req]).token_ids == [[10, 11, 7]]
    # Next step: the runner knows the emitted token; the buffer grows by what is new only.
    req = ProposalRequest("a", prompt + [9], [10, 11], len(prompt), 2, SamplingParams())
    assert proposer.propose([req]).token_ids == [[7, 8]]      # capped by max_proposals
    assert proposer.buffers["a"].tokens.tolist() == prompt + [9, 10, 11]
    proposer.drop("a")
    assert "a" not in proposer.buffers


# ---- oracle -------------------------------------------------------------------------------------
def oracle_proposals(rate: float, seed: int = 0, steps: int = 400, k: int = 4):
    proposer = OracleProposer(k, rate, seed, vocab_size=100)
    prompt = [1, 2, 3]
    truth = [(i * 37) % 100 for i in range(steps + k)]
    proposer.remember(prompt, truth)
    proposed = []
    for m in range(1, steps):          # the request has emitted m tokens, all on the path
        req = ProposalRequest("r", prompt + truth[:m - 1], truth[m - 1:m], 3, 1000,
                              SamplingParams(temperature=0))
        tokens = proposer.propose([req]).token_ids[0]
        proposed.append((tokens, truth[m:m + k]))
    return proposer, proposed


@pytest.mark.parametrize("rate", [1.0, 0.7, 0.0])
def test_oracle_errs_at_the_configured_rate(rate):
    _, proposed = oracle_proposals(rate)
    right = sum(t == s for tokens, truth in proposed for t, s in zip(tokens, truth))
    total = sum(len(tokens) for tokens, _ in proposed)
    assert total == 4 * len(proposed)
    assert right / total == pytest.approx(rate, abs=0.03)
    assert oracle_proposals(rate)[1] == proposed                  # deterministic
    if 0 < rate < 1:
        assert oracle_proposals(rate, seed=1)[1] != proposed       # ... per seed


def test_oracle_stops_proposing_off_its_path():
    proposer = OracleProposer(3, 1.0, 0, vocab_size=50)
    proposer.remember([1, 2], [5, 6, 7, 8, 9])
    on = ProposalRequest("r", [1, 2], [5], 2, 100, SamplingParams())
    assert proposer.propose([on]).token_ids == [[6, 7, 8]]
    off = ProposalRequest("r", [1, 2, 5], [4], 2, 100, SamplingParams())
    assert proposer.propose([off]).token_ids == [[]] and proposer.num_off_path == 1
    unknown = ProposalRequest("u", [3], [1], 1, 100, SamplingParams())
    assert proposer.propose([unknown]).token_ids == [[]]


def test_oracle_force_path_emits_the_recorded_path():
    """Drafts up to the first wrong one, then the path's next token; None off the record."""
    proposer = OracleProposer(3, 1.0, 0, vocab_size=50, force_path=True)
    proposer.remember([1, 2], [5, 6, 7, 8, 9])
    assert proposer.propose([ProposalRequest("r", [1, 2], [5], 2, 100,
                                             SamplingParams())]).token_ids == [[6, 7, 8]]
    assert proposer.forced_tokens("r", [1, 2], 1, [6, 7, 8]) == [6, 7, 8, 9]
    assert proposer.forced_tokens("r", [1, 2], 1, [6, 4, 8]) == [6, 7]
    assert proposer.forced_tokens("r", [1, 2], 1, [3, 7, 8]) == [6]
    assert proposer.forced_tokens("r", [1, 2], 5, []) is None           # path's end
    assert proposer.forced_tokens("u", [3], 1, [1]) is None             # no record
    assert proposer.forced_tokens("s", [1, 2], 2, []) == [7]            # not proposed for yet
    plain = OracleProposer(3, 1.0, 0, vocab_size=50)
    plain.remember([1, 2], [5, 6, 7, 8, 9])
    plain.propose([ProposalRequest("r", [1, 2], [5], 2, 100, SamplingParams())])
    assert plain.forced_tokens("r", [1, 2], 1, [6, 7, 8]) is None


def test_draft_backoff_grows_then_caps():
    from loom.scheduler import MAX_DRAFT_BACKOFF, draft_backoff
    assert [draft_backoff(m) for m in range(10)] == [0, 0, 0, 0, 1, 2, 4, 8, 16, 32]
    assert draft_backoff(40) == MAX_DRAFT_BACKOFF


# ---- scheduler ----------------------------------------------------------------------------------
def make_scheduler(num_blocks=32, budget=64, lookahead=0, k=4, max_len=64):
    kv = KVCacheManager(num_blocks, 4, True)
    return Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=max_len,
                     num_spec_tokens=k, num_lookahead_tokens=lookahead)


def start(sched: Scheduler, prompt_len=6, max_tokens=20) -> Request:
    """A request through its prefill step, with drafts 100..103 proposed."""
    req = Request("r", list(range(1, prompt_len + 1)), SamplingParams(temperature=0),
                  max_tokens=max_tokens)
    sched.add_request(req)
    out = sched.schedule()
    sched.update(out, ModelRunnerOutput(["r"], [[50]], [None], [[100, 101, 102, 103]]))
    return req


def test_drafts_are_scheduled_and_rejected_ones_rolled_back():
    sched = make_scheduler(lookahead=4)
    req = start(sched)
    assert req.spec_token_ids == [100, 101, 102, 103] and req.num_computed_tokens == 6
    assert len(sched.kv.block_ids("r")) == 2                    # 7 tokens: the tail was freed
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"r": 5} and out.scheduled_spec_tokens == {
        "r": [100, 101, 102, 103]}
    # 6 computed + 5 scheduled + 4 lookahead slots of the draft model = 15 tokens: 4 blocks.
    assert len(sched.kv.block_ids("r")) == 4 and out.cached_requests[0].num_kept_blocks == 2
    sched.update(out, ModelRunnerOutput(["r"], [[100, 101, 60]], [None], [[1, 2, 3, 4]]))
    assert req.output_token_ids == [50, 100, 101, 60]
    assert req.num_computed_tokens == 9                           # 6 + last token + 2 drafts
    assert len(sched.kv.block_ids("r")) == 3                      # 10 tokens
    stats = sched.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 4, 2)
    assert stats.accepted_per_position == [1, 1, 0, 0]
    assert (req.num_draft_tokens, req.num_accepted_tokens) == (4, 2)


def test_budget_cuts_drafts_and_max_tokens_cuts_proposals():
    sched = make_scheduler(budget=3)
    start(sched, prompt_len=3)
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"r": 3} and out.scheduled_spec_tokens == {"r": [100, 101]}
    sched = make_scheduler()
    req = start(sched, max_tokens=3)              # 1 emitted: 2 more, so at most 1 draft
    assert req.spec_token_ids == [100]


def test_stop_inside_an_accepted_run_truncates_and_frees():
    sched = make_scheduler()
    req = start(sched, max_tokens=20)
    req.sampling_params.stop_token_ids = [101]
    out = sched.schedule()
    sched.update(out, ModelRunnerOutput(["r"], [[100, 101, 102, 103, 7]], [None], [[]]))
    assert req.output_token_ids == [50, 100, 101] and req.status == RequestStatus.FINISHED_STOPPED
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    sched = make_scheduler()
    req = start(sched, max_tokens=3)
    req.spec_token_ids = [100, 101, 102]          # more than max_tokens allows
    out = sched.schedule()
    sched.update(out, ModelRunnerOutput(["r"], [[100, 101, 102, 7]], [None], [[]]))
    assert req.output_token_ids == [50, 100, 101] and req.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_padding_drafts_for_uniform_batches():
    sched = make_scheduler(max_len=12)
    sched.pad_drafts = True
    a = start(sched, prompt_len=6)
    a.spec_token_ids = [100]                    # a short proposal
    out = sched.schedule()
    assert out.scheduled_spec_tokens == {"r": [100, -1, -1, -1]}    # up to k = 4
    # Two accepted would be impossible: a padding draft is never accepted.
    sched.update(out, ModelRunnerOutput(["r"], [[100, 9]], [None], [[]]))
    assert a.num_computed_tokens == 8 and a.output_token_ids == [50, 100, 9]
    stats = sched.spec_stats
    assert (stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 1)   # real drafts only
    a.spec_token_ids = [7]
    out = sched.schedule()                      # 9 tokens of max-model-len 12: 2 drafts fit
    assert out.scheduled_spec_tokens == {"r": [7, -1]}


def test_backoff_steps_propose_nothing_and_let_the_next_step_go_ahead():
    """Three steps of backoff: the first two ask for no proposals (theirs would be drafts of a
    backoff step) and reserve no lookahead slots; the second is scheduled before the first's
    token is known; the third proposes, so its result comes before the fourth, which drafts."""
    sched = make_scheduler(lookahead=4)
    sched.async_scheduling = True
    req = start(sched)                                   # 7 tokens
    req.spec_token_ids, req.draft_backoff = [], 3        # as after a missed verification
    first = sched.schedule()
    assert first.backoff_req_ids == {"r"} and first.scheduled_spec_tokens == {}
    assert len(sched.kv.block_ids("r")) == 2             # 7 computed, no lookahead
    assert not sched.needs_host_tokens()
    second = sched.schedule()                            # while `first` is in flight
    assert second.num_scheduled_tokens == {"r": 1} and second.backoff_req_ids == {"r"}
    assert req.num_output_placeholders == 2 and req.num_computed_tokens == 8
    assert sched.needs_host_tokens()                     # the third proposes
    sched.update(first, ModelRunnerOutput(["r"], [[60]], [None], [[1, 2, 3, 4]]))
    assert req.spec_token_ids == [] and len(sched.kv.block_ids("r")) == 2
    sched.update(second, ModelRunnerOutput(["r"], [[61]], [None], [[1, 2, 3, 4]]))
    assert req.spec_token_ids == [] and req.num_output_placeholders == 0
    third = sched.schedule()
    assert third.backoff_req_ids == set() and req.draft_backoff == 0
    assert len(sched.kv.block_ids("r")) == 4             # 9 computed + 4 lookahead slots
    assert sched.needs_host_tokens()
    sched.update(third, ModelRunnerOutput(["r"], [[62]], [None], [[5, 6, 7, 8]]))
    assert req.spec_token_ids == [5, 6, 7, 8]
    assert sched.schedule().scheduled_spec_tokens == {"r": [5, 6, 7, 8]}
    assert sched.needs_host_tokens()                     # drafts in flight
    assert req.output_token_ids == [50, 60, 61, 62] and req.num_output_placeholders == 0


# ---- statistics and metrics ---------------------------------------------------------------------
def test_stats_and_prometheus_counters():
    pytest.importorskip("prometheus_client")
    from loom.scheduler import SchedulerStats
    from loom.server.metrics import Metrics

    stats = SpecDecodeStats()
    stats.observe(4, 3)
    stats.observe(2, 0)
    assert stats.acceptance_rate == 0.5 and stats.mean_accepted_length == 2.5
    assert stats.accepted_per_position == [1, 1, 1, 0]
    metrics = Metrics("m", speculative=True)
    # The scheduler's figures after each step carry a copy of the running totals.
    metrics.on_step(SchedulerStats(spec_decode=stats.copy()), [])
    stats.observe(3, 3)
    metrics.on_step(None, [])                   # an abort: no scheduler figures
    metrics.on_step(SchedulerStats(spec_decode=stats.copy()), [])
    text = metrics.render().decode()
    for name, value in (("loom:spec_decode_num_drafts_total", 3),
                        ("loom:spec_decode_num_draft_tokens_total", 9),
                        ("loom:spec_decode_num_accepted_tokens_total", 6)):
        assert f'{name}{{model_name="m"}} {float(value)}' in text
    assert ('loom:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="2"} 2.0'
            in text)
    assert "spec_decode" not in Metrics("m").render().decode()
