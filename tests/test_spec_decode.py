"""Speculative decoding end to end on the tiny models (CPU, float32): every method's greedy
output equals plain decoding token for token, under chunked prefill, prefix caching, forced
preemption, n > 1, stop strings, stop tokens and max_tokens; sampling is reproducible and
draws from the target (a draft that *is* the target is always accepted); the config refuses bad
settings by name.
"""
from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams
from loom.config import ConfigError
from loom.spec_decode.oracle import record_greedy

PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a little town by the sea, and every morning",
    "What is the capital of France?",
    "The scheduler batches many requests together and runs them step by step, while new "
    "requests arrive and finished ones leave. Paged attention stores the keys",
]
# Shared prefixes (prefix caching) and more sequences than the small cache holds (preemption).
STRESS_PROMPTS = PROMPTS + [PROMPTS[3] + " of every sequence", PROMPTS[1] + " again"]
MAX_TOKENS = 16


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The CPU is shared with other processes: one intra-op thread is far faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_llm(path, **config) -> LLM:
    defaults = dict(dtype="float32", max_model_len=80, max_num_seqs=8)
    return LLM(str(path), **(defaults | config))


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **({"max_tokens": MAX_TOKENS} | kw))


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory):
    """A different tiny model with the test models' vocabulary: one layer, half the width."""
    from loom.demo_model import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("draft") / "draft", "llama", seed=7,
                            num_hidden_layers=1, hidden_size=32, head_dim=8,
                            intermediate_size=64)


def spec_config(method: str, path, draft_model, k: int = 3) -> dict:
    if method == "ngram":
        return {"method": "ngram", "num-speculative-tokens": k, "prompt-lookup-min": 1}
    if method == "draft":
        return {"method": "draft", "num-speculative-tokens": k, "model": str(draft_model)}
    if method == "draft_self":      # the target as its own draft: everything is accepted
        return {"method": "draft", "num-speculative-tokens": k, "model": str(path)}
    if method == "oracle_wrong":    # every draft rejected: requests back off
        return {"method": "oracle", "num-speculative-tokens": k, "acceptance-rate": 0.0}
    return {"method": "oracle", "num-speculative-tokens": k, "acceptance-rate": 0.8}


def stress_params(plain_text: str, plain_tokens: list[int]) -> list[SamplingParams]:
    """One SamplingParams per STRESS_PROMPTS entry: n > 1, a stop string and a stop token taken
    from plain decoding's output (so they land inside accepted runs), short max_tokens."""
    middle = plain_text[len(plain_text) // 3:].strip()
    stop = [middle[:3]] if len(middle) >= 3 else []
    return [greedy(n=2), greedy(stop=stop), greedy(max_tokens=5),
            greedy(stop_token_ids=[plain_tokens[6]]), greedy(max_tokens=9), greedy(n=2)]


def summary(outputs) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outputs]


_plain = {}


def plain_run(path):
    """Plain decoding of STRESS_PROMPTS with stress_params, once per model."""
    if path not in _plain:
        llm = make_llm(path)
        first = llm.generate(STRESS_PROMPTS[1], greedy(), use_tqdm=False)[0].outputs[0]
        params = stress_params(first.text, first.token_ids)
        _plain[path] = params, summary(llm.generate(STRESS_PROMPTS, params, use_tqdm=False))
    return _plain[path]


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("method", ["ngram", "draft", "draft_self", "oracle", "oracle_wrong"])
def test_greedy_equals_plain_under_stress(tiny_models, tiny_model_name, draft_model, method,
                                          async_scheduling):
    """Chunked prefill (8-token budget), prefix caching (shared prompts, 4-token blocks),
    preemption (20 blocks for 8 sequences of up to 72 tokens), n > 1, stop strings and tokens
    and max_tokens inside accepted runs: the outputs of plain decoding, and no block leaked;
    with async scheduling, some steps launched before the previous one's tokens are known."""
    path = tiny_models[tiny_model_name]
    params, expected = plain_run(path)
    llm = make_llm(path, speculative=spec_config(method, path, draft_model),
                   max_num_batched_tokens=8, block_size=4, num_gpu_blocks_override=20,
                   async_scheduling=async_scheduling)
    engine = llm.engine
    if method.startswith("oracle"):
        tok = llm.get_tokenizer()
        record_greedy(engine, [tok.encode(p) for p in STRESS_PROMPTS], MAX_TOKENS)
        assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    before = engine.spec_decode_stats.copy()
    engine.core.step_records = records = []
    assert summary(llm.generate(STRESS_PROMPTS, params, use_tqdm=False)) == expected
    stats = engine.spec_decode_stats.since(before)
    assert stats.num_draft_tokens > 0
    assert engine.scheduler.num_preemptions > 0 and engine.kv_cache.prefix_hits > 0
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert any(r.ahead for r in records) == async_scheduling
    if method == "draft_self":
        assert stats.acceptance_rate > 0.95
    if method == "oracle":
        assert 0.3 < stats.acceptance_rate < 0.95
        assert stats.mean_accepted_length > 2
    if method == "oracle_wrong":
        assert stats.num_accepted_tokens == 0
        # Decode steps of requests in backoff, each launched while a token was in flight.
        assert any(r.ahead and r.num_tokens == r.num_seqs for r in records) == async_scheduling


def test_stops_inside_accepted_runs(tiny_models):
    """The oracle at acceptance 1.0 and k = 4 emits tokens 1-5, 6-10, ... in one verification
    each: a stop token at index 7 and a stop string ending inside token 3 cut runs short."""
    path = tiny_models["llama"]
    plain = make_llm(path)
    tok = plain.get_tokenizer()
    prompt = PROMPTS[1]
    tokens = plain.generate(prompt, greedy(), use_tqdm=False)[0].outputs[0].token_ids
    stop_token = tokens[7]
    assert stop_token not in tokens[:7]
    before, upto = tok.decode(tokens[:3]), tok.decode(tokens[:4])
    piece = upto[len(before):][:2]
    assert piece.strip() and piece not in before
    params = [greedy(stop_token_ids=[stop_token]), greedy(stop=[piece]),
              greedy(stop=[piece], include_stop_str_in_output=True)]
    expected = summary(plain.generate([prompt] * 3, params, use_tqdm=False))
    llm = make_llm(path, speculative={"method": "oracle", "num-speculative-tokens": 4})
    record_greedy(llm.engine, [tok.encode(prompt)], MAX_TOKENS)
    assert summary(llm.generate([prompt] * 3, params, use_tqdm=False)) == expected
    assert expected[0][0][0] == tokens[:8] and expected[1][0][2] == "stop"
    assert llm.spec_decode_stats.acceptance_rate == 1.0


def test_greedy_processing_matches_plain(tiny_models, draft_model):
    """Penalties, min_tokens and logprobs at every verified position are those of plain
    decoding: drafts before a position count as outputs."""
    path = tiny_models["llama"]
    params = [greedy(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3),
              greedy(min_tokens=12, logprobs=2), greedy(logprobs=3)]
    prompts = PROMPTS[1:]
    plain = make_llm(path).generate(prompts, params, use_tqdm=False)
    for method in ("ngram", "draft_self"):
        llm = make_llm(path, speculative=spec_config(method, path, draft_model, k=4))
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert summary(outs) == summary(plain)
        assert llm.spec_decode_stats.num_accepted_tokens > 0
        for got, ref in zip(outs[1:], plain[1:]):
            for g, r in zip(got.outputs[0].logprobs, ref.outputs[0].logprobs):
                assert g.keys() == r.keys()
                assert all(abs(g[t].logprob - r[t].logprob) < 1e-4 for t in g)


def test_padded_drafts_change_nothing(tiny_models):
    """With verification graphs every decoding request gets k drafts, padded: outputs and
    the counts of proposed and accepted drafts stay those of unpadded steps."""
    path = tiny_models["mistral"]
    spec = {"method": "ngram", "num-speculative-tokens": 4, "prompt-lookup-min": 1}
    params = [greedy(max_tokens=24), greedy(n=2, max_tokens=20),
              SamplingParams(temperature=0.9, seed=3, max_tokens=20, repetition_penalty=1.2)]
    results = []
    for pad in (False, True):
        llm = make_llm(path, speculative=spec)
        llm.engine.scheduler.pad_drafts = pad
        steps = []
        schedule = llm.engine.scheduler.schedule
        llm.engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]
        outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
        stats = llm.spec_decode_stats
        results.append((summary(outs), stats.num_draft_tokens, stats.num_accepted_tokens))
        padded = [d for s in steps for d in s.scheduled_spec_tokens.values() if -1 in d]
        assert bool(padded) == pad
        assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks
    assert results[0] == results[1] and results[0][2] > 0


def test_sampling_with_seeds_is_reproducible_and_exact_for_a_perfect_draft(tiny_models):
    """Seeded sampled requests give the same tokens run after run, alone or batched; a draft
    equal to the target (q == p) is accepted every time, so its probabilities reach the
    verification aligned with its tokens, under temperature, top-k, top-p and min-p."""
    path = tiny_models["qwen3"]
    spec = spec_config("draft_self", path, None, k=4)
    params = [SamplingParams(temperature=0.8, seed=11, max_tokens=20),
              SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, seed=5,
                             max_tokens=20, n=2),
              SamplingParams(temperature=0.7, max_tokens=20)]
    llm = make_llm(path, speculative=spec)
    first = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert llm.spec_decode_stats.acceptance_rate > 0.99
    again = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    alone = llm.generate(PROMPTS[1], params[1], use_tqdm=False)[0]
    assert [c.token_ids for c in again[1].outputs] == [c.token_ids for c in first[1].outputs]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in first[1].outputs]
    assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    assert first[1].outputs[0].token_ids != first[1].outputs[1].token_ids   # seeds differ
    metrics = first[1].metrics
    assert metrics["spec_num_accepted_tokens"] == metrics["spec_num_draft_tokens"] > 0


def test_async_scheduling_stays_on_and_is_logged(tiny_models, caplog):
    path = tiny_models["llama"]
    with caplog.at_level("INFO", logger="loom"):
        llm = make_llm(path, speculative={"method": "ngram", "num-speculative-tokens": 2})
    assert llm.engine.async_scheduling is True
    assert "with async scheduling: a step is launched before" in caplog.text
    with caplog.at_level("INFO", logger="loom"):
        llm.generate(PROMPTS[0], greedy(), use_tqdm=False)
    assert "speculative decoding:" in caplog.text and "accepted" in caplog.text


def backoff_steps(max_tokens: int) -> list[tuple[bool, bool]]:
    """Per decode step of a request whose every draft is rejected: (drafts verified, launched
    ahead), by the rule: four verifications, then 1, 2, 4 ... steps without drafts before each
    next one; a step goes ahead when it follows one of those with at least two more to come;
    no drafts where max_tokens leaves room for one token only."""
    from loom.scheduler import draft_backoff
    steps, backoff, missed, left = [], 0, 0, 0
    for num_out in range(1, max_tokens):
        ahead = left >= 2
        if backoff:
            backoff -= 1
            steps.append((False, ahead))
            left = backoff
        elif max_tokens - num_out >= 2:
            missed += 1
            backoff = draft_backoff(missed)
            steps.append((True, ahead))
            left = 0
        else:
            steps.append((False, ahead))
            left = 0
    return steps


def traced_run(llm, prompt, params):
    """Generate, and per step with tokens: (drafts verified, launched ahead)."""
    core = llm.engine.core
    drafted = []
    schedule = core.scheduler.schedule
    core.scheduler.schedule = lambda: drafted.append(schedule()) or drafted[-1]
    core.step_records = []
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    core.scheduler.schedule = schedule
    steps = [(bool(s.scheduled_spec_tokens), r.ahead)
             for s, r in zip(drafted, core.step_records) if not s.is_empty]
    return out, steps


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_rejected_drafts_back_off_and_backoff_steps_go_ahead(tiny_models, async_scheduling):
    """At 0% acceptance a request verifies drafts, then decodes 1, 2, 4 ... 32 steps without
    any, exactly as the rule says, async or not; most of those steps are launched while the
    previous one's token is still on the device. At 100% every step verifies: none goes
    ahead."""
    path = tiny_models["llama"]
    max_tokens = 110
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    plain = make_llm(path, max_model_len=160).generate(PROMPTS[0], params, use_tqdm=False)
    llm = make_llm(path, max_model_len=160, async_scheduling=async_scheduling,
                   speculative={"method": "oracle", "num-speculative-tokens": 4,
                                "acceptance-rate": 0.0, "force-path": True})
    record_greedy(llm.engine, [llm.get_tokenizer().encode(PROMPTS[0])], max_tokens)
    tokens, steps = traced_run(llm, PROMPTS[0], params)
    assert tokens == plain[0].outputs[0].token_ids
    expected = backoff_steps(max_tokens)
    if not async_scheduling:
        expected = [(drafted, False) for drafted, _ in expected]
    assert steps[0] == (False, False) and steps[1:] == expected      # the prompt's step first
    ahead = sum(a for _, a in steps) / len(steps)
    assert ahead > 0.75 if async_scheduling else ahead == 0
    assert (llm.spec_decode_stats.num_drafts, llm.spec_decode_stats.num_accepted_tokens) == (
        sum(d for d, _ in expected), 0)
    llm.engine.proposer.acceptance_rate = 1.0
    tokens, steps = traced_run(llm, PROMPTS[0], params)
    assert tokens == plain[0].outputs[0].token_ids
    assert all(drafted for drafted, _ in steps[1:-1]) and not any(a for _, a in steps)


def test_a_draft_model_drafts_again_after_its_backoff(tiny_models):
    """The target as its own draft, its proposals spoiled up to the 20th output: the request
    backs off, and the draft model proposes nothing during the backoff; its steps go ahead,
    their tokens reaching the draft's KV cache from the device. Once the backoff ends the
    request drafts again, and its drafts are accepted: only if that cache holds every token."""
    path = tiny_models["llama"]
    params = greedy(max_tokens=40, ignore_eos=True)
    plain = make_llm(path).generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    llm = make_llm(path, speculative=spec_config("draft_self", path, None, k=3))
    scheduler, vocab = llm.engine.scheduler, llm.engine.model_config.vocab_size
    scheduled, proposed_in = [], []
    schedule, propose = scheduler.schedule, llm.engine.proposer.propose

    def spoiled(requests):
        proposed_in.append(scheduled[-1])        # the step being executed
        out = propose(requests)
        out.token_ids = [[(t + 1) % vocab for t in tokens] if r.num_output_tokens <= 20
                         else tokens for r, tokens in zip(requests, out.token_ids)]
        return out
    llm.engine.proposer.propose = spoiled
    scheduler.schedule = lambda: scheduled.append(schedule()) or scheduled[-1]
    verified = []                       # (outputs before the step, drafts, tokens emitted)
    update = scheduler.update

    def traced_update(sched, result):
        for rid, tokens in zip(result.req_ids, result.sampled_token_ids):
            if sched.scheduled_spec_tokens.get(rid):
                verified.append((scheduler.requests[rid].num_output_tokens,
                                 sched.scheduled_spec_tokens[rid], tokens))
        return update(sched, result)
    scheduler.update = traced_update
    llm.engine.core.step_records = records = []
    assert llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids == (
        plain.token_ids)
    backoff_steps = [s for s in scheduled if s.backoff_req_ids]
    assert len(backoff_steps) >= 10 and not any(s.backoff_req_ids for s in proposed_in)
    assert sum(r.ahead for r in records) >= 8
    spoilt = [v for v in verified if v[0] <= 20]
    later = [v for v in verified if v[0] > 20]
    assert len(spoilt) >= 6 and all(len(emitted) == 1 for _, _, emitted in spoilt)
    assert later[0][0] > 21 and len(later) >= 3     # drafts again after the backoff ...
    accepted = sum(len(emitted) - 1 for _, _, emitted in later)
    assert accepted >= 0.9 * sum(len(d) for _, d, _ in later)    # ... and right


def test_seeded_sampling_is_the_same_whatever_the_batch_and_steps_ahead(tiny_models):
    """Requests "a*" get drafts of token 0, all but never accepted, so they back off and their
    steps go ahead; "b" gets none, so a step with it proposes. A seeded request (also with
    logprobs, top-k and n = 2) draws the same tokens alone or next to "b", with async
    scheduling or without: a step without drafts samples through the verification's draws."""
    from loom.spec_decode.proposer import Proposals

    path = tiny_models["qwen2"]
    ours = [("a", PROMPTS[0], SamplingParams(temperature=0.8, seed=11, max_tokens=60,
                                             ignore_eos=True, logprobs=2)),
            ("a2", PROMPTS[1], SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=60,
                                              ignore_eos=True, n=2))]
    other = ("b", PROMPTS[2], SamplingParams(temperature=1.0, seed=3, max_tokens=60))
    results = []
    for async_scheduling, requests in ((True, ours), (False, ours), (True, ours + [other])):
        llm = make_llm(path, async_scheduling=async_scheduling,
                       speculative={"method": "ngram", "num-speculative-tokens": 3})
        llm.engine.proposer.propose = lambda reqs: Proposals(
            [[0, 0, 0] if r.req_id.startswith("a") else [] for r in reqs])
        llm.engine.core.step_records = records = []
        outputs = run_engine(llm.engine, requests)
        results.append({rid: outputs[rid] for rid, _, _ in ours})
        decodes_ahead = sum(r.ahead and r.num_tokens == r.num_seqs for r in records)
        assert decodes_ahead > 20 if async_scheduling and len(requests) == 2 else (
            decodes_ahead == 0)
    for got in results[1:]:
        assert {rid: [c.token_ids for c in outs] for rid, outs in got.items()} == {
            rid: [c.token_ids for c in outs] for rid, outs in results[0].items()}
        for g, r in zip(got["a"][0].logprobs, results[0]["a"][0].logprobs):
            assert g.keys() == r.keys()       # batch shapes move logprobs by rounding only
            assert all(abs(g[t].logprob - r[t].logprob) < 1e-4 for t in g)


def run_engine(engine, requests) -> dict:
    """Per request id: its sequences (CompletionOutputs), once finished."""
    for rid, prompt, params in requests:
        engine.add_request(prompt, params, request_id=rid)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs
    return done


@pytest.mark.parametrize("spec, match", [
    ({"num-speculative-tokens": 2}, r"'speculative.method': required"),
    ({"method": "medusa", "num-speculative-tokens": 2},
     r"'speculative.method': expected one of ngram, draft, oracle, got 'medusa'"),
    ({"method": "ngram"}, r"'speculative.num-speculative-tokens': required"),
    ({"method": "ngram", "num-speculative-tokens": 0},
     r"'speculative.num-speculative-tokens': expected an integer >= 1"),
    ({"method": "ngram", "num-speculative-tokens": 2, "prompt-lookup-min": 4,
      "prompt-lookup-max": 3}, r"'speculative.prompt-lookup-min': expected <= prompt-lookup-max"),
    ({"method": "ngram", "num-speculative-tokens": 2, "model": "x"},
     r"'speculative.model': only for method draft"),
    ({"method": "draft", "num-speculative-tokens": 2},
     r"'speculative.model': expected a model directory"),
    ({"method": "draft", "num-speculative-tokens": 2, "model": "m", "dtype": "int8"},
     r"'speculative.dtype': expected one of auto, float32"),
    ({"method": "oracle", "num-speculative-tokens": 2, "acceptance-rate": 1.5},
     r"'speculative.acceptance-rate': expected a number in \[0, 1\]"),
    ({"method": "ngram", "num-speculative-tokens": 2, "lookahead": 1},
     r"unknown config key 'speculative.lookahead'"),
])
def test_bad_speculative_config(spec, match):
    from loom.config import build_config
    with pytest.raises(ConfigError, match=match):
        build_config({"model": "m", "speculative": spec})


def test_bad_draft_models(tiny_models, tmp_path):
    from loom.demo_model import build_tiny_model
    path = tiny_models["llama"]
    with pytest.raises(ConfigError, match="'speculative.model': .*is not a model directory"):
        make_llm(path, speculative={"method": "draft", "num-speculative-tokens": 2,
                                    "model": str(tmp_path / "missing")})
    other = build_tiny_model(tmp_path / "other_vocab", "llama", vocab_size=600)
    with pytest.raises(ConfigError, match=r"'speculative.model': the draft's vocabulary has 600"):
        make_llm(path, speculative={"method": "draft", "num-speculative-tokens": 2,
                                    "model": str(other)})


def test_speculative_on_the_command_line_takes_yaml_or_json(tmp_path):
    from loom.cli import build_parser, config_from_args
    for text in ('{"method": "ngram", "num-speculative-tokens": 3}',
                 "{method: ngram, num-speculative-tokens: 3}"):
        args = build_parser().parse_args(["generate", "m", "--speculative", text])
        assert config_from_args(args).speculative == {"method": "ngram",
                                                      "num-speculative-tokens": 3}


@pytest.mark.parametrize("engine_core", ["process", "thread"])
def test_server_metrics_count_drafts(tiny_models, engine_core):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from live_server import MODEL_NAME, LiveServer

    path = tiny_models["llama"]
    server = LiveServer(path, engine_core=engine_core, max_model_len=80, max_num_seqs=4,
                        speculative=spec_config("draft_self", path, None, k=3))
    try:
        reply = server.client().completions.create(model=MODEL_NAME, prompt=PROMPTS[0],
                                                   max_tokens=12, temperature=0)
        expected = make_llm(path).generate(PROMPTS[0], greedy(max_tokens=12), use_tqdm=False)
        assert reply.choices[0].text == expected[0].outputs[0].text
        with server.http() as http:
            text = http.get("/metrics").text
    finally:
        server.stop()
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("loom:spec_decode") and "_total{" in line}
    assert values["loom:spec_decode_num_draft_tokens_total"] > 0
    assert (values["loom:spec_decode_num_accepted_tokens_total"]
            == values["loom:spec_decode_num_draft_tokens_total"])


@pytest.mark.parametrize("rate", [1.0, 0.5, 0.0])
def test_oracle_force_path_holds_the_set_acceptance(tiny_models, rate):
    """The benchmark mode: output is the recorded greedy path, every draft token right with
    probability ``rate``, so k drafts accept sum(rate**j, j=1..k) / k of them on average."""
    path = tiny_models["llama"]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in make_llm(path).generate(PROMPTS, params,
                                                                      use_tqdm=False)]
    llm = make_llm(path, speculative={"method": "oracle", "num-speculative-tokens": 3,
                                      "acceptance-rate": rate, "force-path": True})
    tok = llm.get_tokenizer()
    record_greedy(llm.engine, [tok.encode(p) for p in PROMPTS], 48)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == plain
    stats = llm.spec_decode_stats
    assert stats.num_draft_tokens > 30
    expected = sum(rate ** j for j in range(1, 4)) / 3
    assert stats.acceptance_rate == pytest.approx(expected, abs=0.08)
    steps = len(PROMPTS) * 48
    if rate == 0.0:         # drafts that always fail back off: few verifications
        assert stats.num_drafts < steps / 4
