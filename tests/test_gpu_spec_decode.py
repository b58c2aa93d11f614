"""On a GPU (`pytest -m gpu`): speculative decoding on the fast path (triton attention, decode
and verify graphs) gives plain decoding's greedy tokens, and its graphs are the ones replayed."""
import pytest
import torch

from loom import LLM, SamplingParams
from loom.spec_decode.oracle import record_greedy

pytestmark = pytest.mark.gpu

PROMPTS = ["The quick brown fox", "Once upon a time there was a little town by the sea",
           "What is the capital of France?", "Paged attention stores the keys and values " * 6]
BASE = dict(max_model_len=512, max_num_seqs=16, kv_cache_memory_gb=1.0, dtype="float32")


@pytest.fixture(scope="module")
def model(tiny_models):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    return tiny_models["llama3"]


def generate(llm, n_tokens=32):
    params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def plain(model):
    return generate(LLM(str(model), **BASE))


def count_replays(monkeypatch, graphs) -> list:
    replays = []
    run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda hb: replays.append(hb.num_seqs) or run(hb))
    return replays


@pytest.mark.parametrize("method", ["ngram", "draft_self", "oracle"])
def test_spec_decode_on_graphs_equals_plain(model, plain, method, monkeypatch):
    spec = {"ngram": {"method": "ngram", "num-speculative-tokens": 3, "prompt-lookup-min": 1},
            "draft_self": {"method": "draft", "num-speculative-tokens": 3, "model": str(model)},
            "oracle": {"method": "oracle", "num-speculative-tokens": 3}}[method]
    llm = LLM(str(model), speculative=spec, **BASE)
    runner = llm.engine.executor.runner
    assert runner.graphs is not None and runner.spec_graphs is not None
    assert runner.spec_graphs.query_len == 4
    if method == "oracle":
        tok = llm.get_tokenizer()
        record_greedy(llm.engine, [tok.encode(p) for p in PROMPTS], 32)
    replays = count_replays(monkeypatch, runner.spec_graphs)
    assert generate(llm) == plain
    stats = llm.spec_decode_stats
    assert stats.num_draft_tokens > 0
    if method != "ngram":
        assert replays, "no verification step replayed a graph"
        assert stats.acceptance_rate > 0.95
    if method == "draft_self":
        draft_runner = llm.engine.proposer.runner
        assert draft_runner.graphs is not None and draft_runner.spec_graphs is not None


def test_spec_decode_graphs_on_and_off(model):
    spec = {"method": "draft", "num-speculative-tokens": 4, "model": str(model)}
    eager = generate(LLM(str(model), speculative=spec, enforce_eager=True, **BASE))
    graphs = generate(LLM(str(model), speculative=spec, **BASE))
    assert eager == graphs


def test_spec_decode_bf16_perfect_draft_is_accepted(model):
    spec = {"method": "draft", "num-speculative-tokens": 4, "model": str(model)}
    llm = LLM(str(model), speculative=spec, **(BASE | {"dtype": "bfloat16"}))
    generate(llm)
    assert llm.spec_decode_stats.acceptance_rate > 0.9


def test_backoff_steps_launched_ahead_on_graphs(model, plain):
    """Every draft rejected: requests back off and their decode steps (graph replays, tokens
    read from the device) are launched ahead; the tokens are plain decoding's, async or not."""
    spec = {"method": "oracle", "num-speculative-tokens": 3, "acceptance-rate": 0.0,
            "force-path": True}
    for async_scheduling in (True, False):
        llm = LLM(str(model), speculative=spec, async_scheduling=async_scheduling, **BASE)
        record_greedy(llm.engine, [llm.get_tokenizer().encode(p) for p in PROMPTS], 32)
        llm.engine.core.step_records = records = []
        assert generate(llm) == plain
        assert llm.spec_decode_stats.num_accepted_tokens == 0
        ahead = sum(r.ahead for r in records) / len(records)
        assert ahead > 0.3 if async_scheduling else ahead == 0
