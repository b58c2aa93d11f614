"""The engine end to end on tiny real HF models, against transformers' generate (float32, CPU).

Greedy tokens must be equal token for token, and stay equal under chunked prefill, prefix
caching, forced preemption and n > 1; logprobs equal transformers' log-softmax within 1e-4.
"""
from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams

PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a little town by the sea, and every morning",
    "What is the capital of France?",
    "The scheduler batches many requests together and runs them step by step, while new "
    "requests arrive and finished ones leave. Paged attention stores the keys",
]
MAX_TOKENS = 12


class HFReference:
    """transformers' greedy generate and its raw logits, per (model, prompt), computed once."""

    def __init__(self):
        self.models = {}
        self.cache = {}

    def __call__(self, path, prompt_ids: list[int], max_tokens: int = MAX_TOKENS):
        key = (str(path), tuple(prompt_ids), max_tokens)
        if key not in self.cache:
            from transformers import AutoModelForCausalLM
            if str(path) not in self.models:
                self.models[str(path)] = AutoModelForCausalLM.from_pretrained(
                    path, dtype=torch.float32).eval()
            model = self.models[str(path)]
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                                     do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
            tokens = out.sequences[0, len(prompt_ids):].tolist()
            logprobs = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
            self.cache[key] = (tokens, logprobs)
        return self.cache[key]


@pytest.fixture(scope="session")
def hf_reference():
    return HFReference()


def make_llm(path, **config) -> LLM:
    defaults = dict(dtype="float32", max_model_len=256, max_num_seqs=8)
    return LLM(str(path), **(defaults | config))


def greedy(max_tokens=MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def check_against_hf(llm, path, hf_reference, prompts=PROMPTS, params=None, logprobs_tol=None):
    tok = llm.get_tokenizer()
    outputs = llm.generate(prompts, params or greedy(), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids
        ref_tokens, ref_logprobs = hf_reference(path, ids)
        for completion in out.outputs:
            assert completion.token_ids == ref_tokens, prompt
            if logprobs_tol is not None:
                for position, (token, ref) in enumerate(zip(completion.token_ids, ref_logprobs)):
                    entry = completion.logprobs[position]
                    assert abs(entry[token].logprob - ref[token].item()) < logprobs_tol
                    for tid, lp in entry.items():
                        assert abs(lp.logprob - ref[tid].item()) < logprobs_tol
    return outputs


def test_greedy_and_logprobs_match_transformers(tiny_models, tiny_model_name, hf_reference):
    path = tiny_models[tiny_model_name]
    llm = make_llm(path)
    outputs = check_against_hf(llm, path, hf_reference, params=greedy(logprobs=3),
                               logprobs_tol=1e-4)
    assert all(len(o.outputs[0].logprobs[0]) >= 3 for o in outputs)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_chunked_prefill_every_prompt(tiny_models, name, hf_reference):
    path = tiny_models[name]
    llm = make_llm(path, max_num_batched_tokens=8)   # every prompt is split into chunks
    check_against_hf(llm, path, hf_reference)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_prefix_caching_hits_and_output_unchanged(tiny_models, name, hf_reference):
    path = tiny_models[name]
    llm = make_llm(path, block_size=4)
    shared = PROMPTS[3]
    prompts = [shared + " of every sequence", shared + " in fixed size blocks", shared]
    first = check_against_hf(llm, path, hf_reference, prompts=prompts[:1])
    assert first[0].num_cached_tokens == 0
    later = check_against_hf(llm, path, hf_reference, prompts=prompts[1:])
    assert all(o.num_cached_tokens >= 16 for o in later)
    assert llm.engine.kv_cache.prefix_hits > 0


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_preemption_resumes_with_same_output(tiny_models, name, hf_reference):
    path = tiny_models[name]
    # 20 blocks of 4 tokens: far fewer than 8 prompts of 5-52 tokens plus 12 outputs each need.
    llm = make_llm(path, block_size=4, num_gpu_blocks_override=20, max_model_len=80)
    prompts = PROMPTS + [p + " again" for p in PROMPTS]
    check_against_hf(llm, path, hf_reference, prompts=prompts)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv_cache.num_free_blocks == 20


def test_n_greater_than_one(tiny_models, hf_reference):
    path = tiny_models["llama"]
    llm = make_llm(path)
    outputs = check_against_hf(llm, path, hf_reference, params=greedy(n=3))
    assert all(len(o.outputs) == 3 for o in outputs)
    sampled = llm.generate(PROMPTS[:1], SamplingParams(n=4, temperature=1.0, seed=7,
                                                       max_tokens=10), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) > 1


def test_seed_is_batch_independent(tiny_models):
    llm = make_llm(tiny_models["llama"])
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=10)
    alone = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=7), params,
              SamplingParams(temperature=1.0, seed=99, max_tokens=12)]
    batch = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], others, use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_stop_strings_and_token_ids(tiny_models, hf_reference):
    path = tiny_models["llama"]
    llm = make_llm(path)
    full = llm.generate([PROMPTS[0]], greedy(max_tokens=20), use_tqdm=False)[0].outputs[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    first = text.find(stop)
    out = llm.generate([PROMPTS[0]], greedy(max_tokens=20, stop=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.text == text[:first] and c.finish_reason == "stop" and c.stop_reason == stop
    kept = llm.generate([PROMPTS[0]], greedy(max_tokens=20, stop=[stop],
                                             include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:first + len(stop)]
    token = full.token_ids[4]
    by_id = llm.generate([PROMPTS[0]], greedy(max_tokens=20, stop_token_ids=[token]),
                         use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(token) + 1]
    assert by_id.stop_reason == token
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks


def test_max_tokens_min_tokens_ignore_eos(tiny_models):
    llm = make_llm(tiny_models["llama"])
    out = llm.generate([PROMPTS[0]], greedy(max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) <= 5
    eos = sorted(llm.engine.eos_token_ids)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=9, min_tokens=9,
                                                    stop_token_ids=[out.token_ids[0]]),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 9 and out.finish_reason == "length"
    assert not set(out.token_ids) & set(eos)


def test_bad_requests_fail_alone(tiny_models, hf_reference, tmp_path):
    path = tiny_models["llama"]
    llm = make_llm(path, max_model_len=64)
    engine = llm.engine
    tok = llm.get_tokenizer()
    good = [engine.add_request(p, greedy()) for p in PROMPTS[:2]]
    engine.step()
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        engine.add_request("", greedy())
    with pytest.raises(ValueError, match=r"prompt: \d+ tokens, but max-model-len is 64"):
        engine.add_request("word " * 100, greedy())
    with pytest.raises(ValueError, match="prompt: token ids"):
        engine.add_request([1, 10**9], greedy())
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("hello", greedy(), request_id=good[0])
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request("hello", SamplingParams(temperature=-1))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    for rid, prompt in zip(good, PROMPTS[:2]):
        assert done[rid].outputs[0].token_ids == hf_reference(path, tok.encode(prompt))[0]
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_abort_frees_blocks(tiny_models):
    llm = make_llm(tiny_models["llama"])
    engine = llm.engine
    a = engine.add_request(PROMPTS[1], greedy(max_tokens=50))
    b = engine.add_request(PROMPTS[2], greedy(max_tokens=5))
    engine.step()
    outs = engine.abort_request([a])
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_chat_uses_the_template(tiny_models):
    llm = make_llm(tiny_models["llama"])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, greedy(max_tokens=4), use_tqdm=False)[0]
    expected = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=True, return_dict=False)
    assert out.prompt_token_ids == list(expected)
    assert len(out.outputs[0].token_ids) >= 1


@pytest.mark.parametrize("setup, match", [
    ("missing", "is not a model directory"),
    ("no_tokenizer", "tokenizer"),
    ("corrupt", "safetensors"),
])
def test_bad_model_dirs(tiny_models, tmp_path, setup, match):
    import shutil
    src = tiny_models["llama"]
    path = tmp_path / setup
    if setup != "missing":
        shutil.copytree(src, path)
    if setup == "no_tokenizer":
        for f in path.glob("tokenizer*"):
            f.unlink()
        for f in ("special_tokens_map.json", "chat_template.jinja"):
            (path / f).unlink(missing_ok=True)
    if setup == "corrupt":
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(ValueError, match=match):
        make_llm(path)


def test_skip_tokenizer_init_takes_token_ids(tiny_models, hf_reference):
    path = tiny_models["llama"]
    llm = make_llm(path, skip_tokenizer_init=True)
    ids = make_llm(path).get_tokenizer().encode(PROMPTS[0])
    out = llm.generate([ids], greedy(), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == hf_reference(path, ids)[0] and out.text == ""
    with pytest.raises(ValueError, match="skip-tokenizer-init"):
        llm.generate(["text"], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="stop:"):
        llm.generate([ids], greedy(stop=["x"]), use_tqdm=False)


def test_async_scheduling_gives_the_sync_outputs(tiny_models):
    """The next step is scheduled before this step's tokens are known; nothing may change:
    seeds, stop strings, penalties (which force a synchronous step), max_tokens and
    preemption with a token in flight."""
    path = tiny_models["llama"]
    params = [greedy(max_tokens=15), SamplingParams(temperature=1.0, seed=3, max_tokens=12),
              greedy(max_tokens=14, stop=["e"]), SamplingParams(temperature=0.7, seed=5,
              max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.5),
              greedy(max_tokens=3), SamplingParams(temperature=0, max_tokens=9, min_tokens=9),
              greedy(max_tokens=16, logprobs=2), SamplingParams(temperature=0.9, max_tokens=16)]
    prompts = PROMPTS + [p + " again" for p in PROMPTS]
    results = []
    for async_scheduling in (False, True):
        llm = make_llm(path, block_size=4, num_gpu_blocks_override=20, max_model_len=80,
                       async_scheduling=async_scheduling)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append([(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                        for o in outs[:-1]])      # the last one is unseeded: random either way
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.kv_cache.num_free_blocks == 20
    assert results[0] == results[1]


def test_output_kinds(tiny_models):
    llm = make_llm(tiny_models["llama"])
    engine = llm.engine
    for kind in ("cumulative", "delta", "final"):
        engine.add_request(PROMPTS[1], greedy(max_tokens=10, output_kind=kind), request_id=kind)
    seen = {"cumulative": [], "delta": [], "final": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out.outputs[0])
    full = seen["cumulative"][-1]
    assert len(seen["final"]) == 1 and seen["final"][0].token_ids == full.token_ids
    assert sum((d.token_ids for d in seen["delta"]), []) == full.token_ids
    assert "".join(d.text for d in seen["delta"]) == full.text
    assert len(seen["cumulative"]) > 1
    # Deltas never send text a stop string later cuts off.
    text = full.text
    stop = text[4:7]
    engine.add_request(PROMPTS[1], greedy(max_tokens=10, output_kind="delta", stop=[stop]),
                       request_id="stopped")
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [o.outputs[0].text for o in engine.step()]
    assert "".join(deltas) == text[:text.find(stop)]
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="stream")


def test_n_siblings_share_the_prompt_blocks(tiny_models, hf_reference):
    path = tiny_models["llama"]
    llm = make_llm(path, block_size=4)
    engine = llm.engine
    prompt = PROMPTS[3]                                   # 52 tokens: 12 full blocks + 1
    engine.add_request(prompt, greedy(n=4))
    engine.step()
    full_blocks = (len(llm.get_tokenizer().encode(prompt)) - 1) // 4
    used = engine.kv_cache.num_blocks - engine.kv_cache.num_free_blocks
    assert used <= full_blocks + 4 * 2                    # not 4 copies of the prompt
    assert engine.kv_cache.prefix_hits >= 3 * full_blocks * 4
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id] = out
    ref = hf_reference(path, llm.get_tokenizer().encode(prompt))[0]
    assert [c.token_ids for c in outs["0"].outputs] == [ref] * 4


def test_speculative_with_tensor_parallel_is_refused(tiny_models):
    from loom.config import ConfigError
    with pytest.raises(ConfigError, match="config key 'speculative': not available with "
                                          "tensor-parallel-size > 1"):
        make_llm(tiny_models["llama"], speculative={"method": "ngram", "num-speculative-tokens": 2},
                 tensor_parallel_size=2)
