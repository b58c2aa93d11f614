"""Scheduler and KV-cache bookkeeping, without a model (tests/fake_runner.py stands in)."""
import pytest

from loom.kv_cache import KVCacheManager
from loom.request import Request, RequestStatus
from loom.sampling_params import SamplingParams
from loom.scheduler import Scheduler

from fake_runner import FakeRunner, next_token


def make(num_blocks=64, block_size=4, budget=64, max_seqs=8, max_len=256, caching=True,
         chunked=True):
    kv = KVCacheManager(num_blocks, block_size, caching)
    sched = Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                      max_model_len=max_len, enable_chunked_prefill=chunked)
    return sched, FakeRunner(block_size, num_blocks)


def req(rid, prompt, max_tokens=8, **kw):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, **kw)
    return Request(rid, list(prompt), params, frozenset(), max_tokens=max_tokens)


def expected(prompt, max_tokens):
    toks = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = next_token(toks)
        toks.append(t)
        out.append(t)
    return out


def run(sched, runner, log=None):
    steps = 0
    while sched.has_unfinished:
        out = sched.schedule()
        if log is not None:
            log.append(out)
        result = runner.execute(out)
        sched.update(out, result)
        steps += 1
        assert steps < 10_000
    return steps


def test_outputs_and_no_leaks():
    sched, runner = make()
    reqs = [req(str(i), range(1 + i, 10 + 3 * i), max_tokens=5 + i) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    run(sched, runner)
    for r in reqs:
        assert r.output_token_ids == expected(r.prompt_token_ids, r.max_tokens)
        assert r.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert not sched.kv.req_blocks


def test_chunked_prefill_splits_prompt_and_shares_steps_with_decodes():
    sched, runner = make(budget=10, caching=False)
    sched.add_request(req("a", range(1, 6), max_tokens=20))
    log = []
    out = sched.schedule(); log.append(out); sched.update(out, runner.execute(out))
    sched.add_request(req("b", range(100, 137), max_tokens=3))  # 37 tokens: 4 chunks
    while sched.has_unfinished:
        out = sched.schedule(); log.append(out); sched.update(out, runner.execute(out))
    chunks = [o.num_scheduled_tokens["b"] for o in log if "b" in o.num_scheduled_tokens]
    assert chunks[:4] == [9, 9, 9, 9] and chunks[4] == 1   # decode of a takes one token each step
    mixed = [o for o in log if o.num_scheduled_tokens.get("a") == 1
             and o.num_scheduled_tokens.get("b", 0) > 1]
    assert len(mixed) >= 3
    assert all(o.total_num_scheduled_tokens <= 10 for o in log)


def test_no_chunking_waits_for_budget():
    sched, runner = make(budget=40, chunked=False, caching=False)
    sched.add_request(req("a", range(1, 31), max_tokens=3))
    sched.add_request(req("b", range(1, 31), max_tokens=3))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 30}   # no 10-token chunk of b
    sched.update(out, runner.execute(out))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 30}


def test_preemption_recomputes_newest_and_output_is_unchanged():
    # 12 blocks of 4 = 48 slots for 4 requests that need 12 + 20 tokens each: must preempt.
    sched, runner = make(num_blocks=12, block_size=4, budget=32, caching=False)
    reqs = [req(str(i), range(10 * i + 1, 10 * i + 13), max_tokens=20) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    run(sched, runner)
    assert sched.num_preemptions > 0
    assert any(r.num_preemptions for r in reqs)
    assert reqs[0].num_preemptions == 0            # the oldest is never the victim
    for r in reqs:
        assert r.output_token_ids == expected(r.prompt_token_ids, 20)
    assert sched.kv.num_free_blocks == 12


def test_prefix_cache_hit_shares_blocks():
    sched, runner = make(block_size=4)
    shared = list(range(1, 13))                      # three full blocks
    a = req("a", shared + [50, 51], max_tokens=2)
    sched.add_request(a)
    run(sched, runner)
    b = req("b", shared + [60], max_tokens=2)
    sched.add_request(b)
    out = sched.schedule()
    assert b.num_cached_tokens == 12
    assert out.num_scheduled_tokens["b"] == 1
    assert out.new_requests[0].num_computed_tokens == 12
    sched.update(out, runner.execute(out))
    run(sched, runner)
    assert b.output_token_ids == expected(b.prompt_token_ids, 2)
    assert sched.kv.prefix_hits == 12


def test_whole_prompt_cached_still_computes_last_token():
    sched, runner = make(block_size=4)
    prompt = list(range(1, 9))                       # exactly two blocks
    sched.add_request(req("a", prompt, max_tokens=1))
    run(sched, runner)
    b = req("b", prompt, max_tokens=1)
    sched.add_request(b)
    out = sched.schedule()
    assert b.num_cached_tokens == 4 and out.num_scheduled_tokens["b"] == 4


def test_lru_evicts_cached_blocks_last_and_forgets_their_hash():
    kv = KVCacheManager(3, 2, True)
    a = req("a", [1, 2, 3, 4, 5])                    # blocks [1,2] [3,4] [5]
    assert kv.allocate_slots(a, 5) is not None
    a.num_computed_tokens = 5
    kv.cache_blocks(a)
    kv.free(a)
    assert kv.num_free_blocks == 3 and len(kv.pool.cached) == 2
    # The uncached partial block is handed out first, then the cached tail before the head.
    b = req("b", [9])
    first = kv.allocate_slots(b, 1)
    assert kv.pool.blocks[first[0]].block_hash is None and len(kv.pool.cached) == 2
    c = req("c", [8])
    kv.allocate_slots(c, 1)
    assert len(kv.pool.cached) == 1                   # one cached block evicted...
    hits, n = kv.get_computed_blocks(req("d", [1, 2, 3, 4, 5]))
    assert n == 2                                     # ...the tail; the head still hits


def test_ref_counts_shared_blocks_survive_one_owner_finishing():
    kv = KVCacheManager(8, 2, True)
    a = req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    kv.cache_blocks(a)
    b = req("b", [1, 2, 3, 4, 6])
    hits, n = kv.get_computed_blocks(b)
    assert n == 4
    kv.allocate_slots(b, 1, hits)
    assert [kv.pool.blocks[h].ref_cnt for h in hits] == [2, 2]
    kv.free(a)
    assert [kv.pool.blocks[h].ref_cnt for h in hits] == [1, 1]
    kv.free(b)
    assert kv.num_free_blocks == 8


def test_max_num_seqs_and_admission_errors():
    sched, runner = make(max_seqs=2, max_len=32)
    for i in range(4):
        sched.add_request(req(str(i), [1, 2, 3]))
    out = sched.schedule()
    assert len(out.num_scheduled_tokens) == 2
    with pytest.raises(ValueError, match="max-model-len"):
        sched.add_request(req("long", range(40)))
    with pytest.raises(ValueError, match="prompt"):
        sched.add_request(req("empty", []))
    with pytest.raises(ValueError, match="request_id"):
        sched.add_request(req("0", [1]))


def test_abort_frees_blocks_and_others_continue():
    sched, runner = make()
    a, b = req("a", range(1, 20), max_tokens=10), req("b", range(1, 9), max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.update(out, runner.execute(out))
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert a.status == RequestStatus.FINISHED_ABORTED
    out = sched.schedule()
    assert "a" in out.finished_req_ids and "a" not in out.num_scheduled_tokens
    sched.update(out, runner.execute(out))
    run(sched, runner)
    assert b.output_token_ids == expected(b.prompt_token_ids, 10)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_stop_conditions():
    sched, runner = make()
    prompt = [5, 6, 7]
    first = expected(prompt, 3)
    eos = req("eos", prompt, max_tokens=10)
    eos.eos_token_ids = frozenset([first[1]])
    stop = req("stop", prompt, max_tokens=10, stop_token_ids=[first[2]])
    ign = req("ign", prompt, max_tokens=4, ignore_eos=True)
    ign.eos_token_ids = frozenset([first[0]])
    for r in (eos, stop, ign):
        sched.add_request(r)
    run(sched, runner)
    assert eos.output_token_ids == first[:2] and eos.finish_reason == "stop"
    assert stop.output_token_ids == first[:3] and stop.stop_reason == first[2]
    assert len(ign.output_token_ids) == 4 and ign.finish_reason == "length"
