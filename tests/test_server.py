"""`loom serve` against the official openai client on 127.0.0.1 (tiny model, float32, CPU):
completions and chat, streaming and not, n, stop strings, seeds, logprobs, the side endpoints,
every error case in OpenAI's shape, and the server still answering after each bad request."""
from __future__ import annotations

import pytest

pytest.importorskip("openai", reason="the server tests use the openai client")
pytest.importorskip("fastapi", reason="the server needs fastapi (pip install loom[server])")

import json
import time

import httpx
import openai

from live_server import MODEL_NAME, LiveServer, one_torch_thread
from loom import LLM, SamplingParams

API_KEY = "test-key"
MAX_MODEL_LEN = 256
CONFIG = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=8)
PROMPTS = ["The quick brown fox", "Once upon a time there was a little town by the sea",
           "What is the capital of France?"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
ERROR_KEYS = {"message", "type", "param", "code"}

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def server(tiny_models):
    s = LiveServer(tiny_models["llama"], api_key=API_KEY, **CONFIG)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(tiny_models):
    return LLM(str(tiny_models["llama"]), dtype="float32", **CONFIG)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def http(server):
    with server.http() as h:
        yield h


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **({"max_tokens": 12} | kw))


def stream_text(chunks, chat: bool = False) -> tuple[dict, dict, list]:
    """Joined text and finish reasons per choice index, and the usage chunks."""
    texts, reasons, usage = {}, {}, []
    for chunk in chunks:
        if chunk.usage is not None:
            usage.append(chunk.usage)
        for c in chunk.choices:
            piece = c.delta.content if chat else c.text
            texts[c.index] = texts.get(c.index, "") + (piece or "")
            if c.finish_reason is not None:
                assert c.index not in reasons, "finish_reason sent twice"
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


# ---- generation --------------------------------------------------------------------------------
def test_completions_greedy_equal_offline(client, offline):
    expected = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=12,
                                      temperature=0, extra_body={"return_token_ids": True})
    assert [c.index for c in whole.choices] == [0, 1, 2]
    for choice, out in zip(whole.choices, expected):
        assert choice.text == out.outputs[0].text
        assert choice.model_extra["token_ids"] == out.outputs[0].token_ids
        assert choice.finish_reason == out.outputs[0].finish_reason
    assert whole.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert whole.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)
    for prompt, out in zip(PROMPTS, expected):
        chunks = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        texts, reasons, usage = stream_text(chunks)
        assert texts == {0: out.outputs[0].text}
        assert reasons == {0: out.outputs[0].finish_reason}
        assert usage[-1].completion_tokens == len(out.outputs[0].token_ids)


def test_token_id_prompts(client, offline):
    ids = offline.get_tokenizer().encode(PROMPTS[0])
    out = offline.generate([ids], greedy(), use_tqdm=False)[0]
    got = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=12, temperature=0)
    assert got.choices[0].text == out.outputs[0].text


def test_chat_greedy_equals_offline(client, offline):
    out = offline.chat(MESSAGES, greedy(), use_tqdm=False)[0]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                           max_completion_tokens=12, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == out.outputs[0].text
    assert whole.usage.prompt_tokens == len(out.prompt_token_ids)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                 max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts, reasons, _ = stream_text(chunks, chat=True)
    assert texts == {0: out.outputs[0].text}
    assert reasons == {0: out.outputs[0].finish_reason}


def test_n2_streaming_and_not(client):
    kw = dict(model=MODEL_NAME, max_tokens=10, temperature=1.0, seed=5, n=2)
    whole = client.completions.create(prompt=PROMPTS[1], **kw)
    assert sorted(c.index for c in whole.choices) == [0, 1]
    assert whole.choices[0].text != whole.choices[1].text
    texts, reasons, _ = stream_text(client.completions.create(prompt=PROMPTS[1], stream=True,
                                                              **kw))
    assert texts == {c.index: c.text for c in whole.choices}       # same seed, same text
    assert set(reasons) == {0, 1}
    chat = client.chat.completions.create(messages=MESSAGES, **kw)
    assert sorted(c.index for c in chat.choices) == [0, 1]
    chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, **kw))
    texts, reasons, _ = stream_text(chunks, chat=True)
    assert texts == {c.index: c.message.content for c in chat.choices}
    assert set(reasons) == {0, 1}


def test_stop_strings(client, offline):
    full = offline.generate([PROMPTS[1]], greedy(max_tokens=20), use_tqdm=False)[0]
    text = full.outputs[0].text
    at = next(i for i in range(4, len(text) - 3) if text.find(text[i:i + 3]) == i)
    stop = text[at:at + 3]
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=[stop])
    whole = client.completions.create(**kw)
    assert whole.choices[0].text == text[:at]
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].model_extra["stop_reason"] == stop
    texts, reasons, _ = stream_text(client.completions.create(stream=True, **kw))
    assert texts == {0: text[:at]} and reasons == {0: "stop"}     # the held-back tail is cut
    included = client.completions.create(extra_body={"include_stop_str_in_output": True}, **kw)
    assert included.choices[0].text == text[:at + 3]


def test_seed_reproducible(client):
    def sample(seed, stream=False):
        kw = dict(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=1.0,
                  seed=seed)
        if stream:
            return stream_text(client.completions.create(stream=True, **kw))[0][0]
        return client.completions.create(**kw).choices[0].text

    first = sample(1234)
    assert sample(1234) == first and sample(1234, stream=True) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_logprobs_equal_offline(client, offline):
    out = offline.generate([PROMPTS[0]], greedy(max_tokens=6, logprobs=3), use_tqdm=False)[0]
    seq = out.outputs[0]
    got = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=6,
                                    temperature=0, logprobs=3).choices[0].logprobs
    assert len(got.tokens) == len(seq.token_ids)
    for i, token_id in enumerate(seq.token_ids):
        assert got.token_logprobs[i] == pytest.approx(seq.logprobs[i][token_id].logprob, abs=1e-5)
        assert 1 <= len(got.top_logprobs[i]) <= 4     # top 3 + sampled, by decoded string
    assert got.text_offset[0] == 0
    assert got.text_offset[-1] == len("".join(got.tokens[:-1]))
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)   # greedy: top 1
        assert entry.bytes == list(entry.token.encode())
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                 max_tokens=6, temperature=0, logprobs=True,
                                                 top_logprobs=2, stream=True))
    streamed = [e.logprob for ch in chunks for c in ch.choices if c.logprobs
                for e in c.logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_penalties_and_extras_through_the_body(client):
    got = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0.8, seed=3,
        presence_penalty=0.5, frequency_penalty=0.5,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True,
                    "min_tokens": 8})
    assert got.usage.completion_tokens == 8 and got.choices[0].finish_reason == "length"


# ---- side endpoints -----------------------------------------------------------------------------
def test_models_health_version_metrics(server, client, http):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME, "tiny-alias"]
    assert client.completions.create(model="tiny-alias", prompt="x", max_tokens=1).choices
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    text = http.get("/metrics").text
    for name in ("loom:num_requests_running", "loom:num_requests_waiting",
                 "loom:kv_cache_usage_perc", "loom:prefix_cache_queries_total",
                 "loom:prefix_cache_hits_total", "loom:prompt_tokens_total",
                 "loom:generation_tokens_total", "loom:num_preemptions_total",
                 "loom:time_to_first_token_seconds_bucket",
                 "loom:inter_token_latency_seconds_bucket",
                 "loom:e2e_request_latency_seconds_bucket"):
        assert f"\n{name}{{" in text, name
    assert metric(http, "loom:generation_tokens_total") > 0
    assert metric(http, "loom:time_to_first_token_seconds_count") > 0


def metric(http, name: str, **labels) -> float:
    """The sum of a metric's samples with these labels."""
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_tokenize_detokenize(http, offline):
    tok = offline.get_tokenizer()
    got = http.post("/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert got["tokens"] == tok.encode(PROMPTS[0]) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == MAX_MODEL_LEN
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == offline.apply_chat_template(MESSAGES)
    back = http.post("/detokenize", json={"tokens": got["tokens"]}).json()
    assert back["prompt"] == tok.decode(got["tokens"])
    assert http.post("/detokenize", json={"tokens": [10 ** 6]}).status_code == 400


@pytest.fixture
def slow_steps(server):
    """Engine steps of 10 ms or more while the test runs."""
    server.set_step_delay(0.01)
    yield
    server.set_step_delay(0.0)


def test_event_loop_answers_while_generating(server, client, http, slow_steps):   # 2 s+
    import threading
    worker = threading.Thread(target=lambda: client.completions.create(
        model=MODEL_NAME, prompt=[PROMPTS[0]] * 4, max_tokens=200, temperature=0,
        extra_body={"ignore_eos": True}))
    worker.start()
    time.sleep(0.3)
    waits = []
    while len(waits) < 5:
        start = time.monotonic()
        assert http.get("/health").status_code == 200
        waits.append(time.monotonic() - start)
    assert worker.is_alive()               # the probes ran while the engine was stepping
    worker.join()
    assert max(waits) < 0.5, waits


# ---- disconnects ---------------------------------------------------------------------------------
def test_disconnect_aborts(server, http, slow_steps):     # 240 tokens: 2.4 s+
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 240, "ignore_eos": True,
            "temperature": 0}
    aborted = metric(http, "loom:request_success_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):            # non-streaming: the client gives up
        http.post("/v1/completions", json=body, timeout=0.3)
    assert server.wait_idle(timeout=3.0) < 1.0
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")     # streaming: read one chunk, hang up
    assert server.wait_idle(timeout=3.0) < 1.0
    server.assert_clean()
    assert metric(http, "loom:request_success_total", finished_reason="abort") == aborted + 2


# ---- errors ----------------------------------------------------------------------------------
LONG_PROMPT = " ".join(["the quick brown fox"] * 12)          # ~ 100 tokens
TOO_LONG = " ".join(["the quick brown fox"] * 40)             # ~ 320 tokens

BAD_REQUESTS = [
    # (path, body, status, param, words the message must contain)
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", []),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p", []),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", []),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n", []),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", []),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", []),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", []),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop", []),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 5}, 400, "presence_penalty", []),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k", []),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens", []),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias", []),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", []),
    ("/v1/completions", {}, 400, "prompt", []),
    ("/v1/completions", {"prompt": [1, 2, 10 ** 6]}, 400, "prompt", []),
    ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 200}, 400, "max_tokens",
     [str(MAX_MODEL_LEN), "200"]),
    ("/v1/completions", {"prompt": TOO_LONG}, 400, "prompt", [str(MAX_MODEL_LEN)]),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", []),
    ("/v1/chat/completions", {}, 400, "messages", []),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages", ["role"]),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs",
     []),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 30}, 400,
     "top_logprobs", []),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": -1}, 400,
     "max_completion_tokens", []),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}],
                              "max_completion_tokens": 150}, 400, "max_completion_tokens",
     [str(MAX_MODEL_LEN), "150"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages", []),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", ["gpt-4"]),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES}, 404, "model", []),
]


def check_error(response: httpx.Response, status: int, param=..., words=()) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    assert isinstance(error["message"], str) and error["message"]
    if param is not ...:
        assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


def still_serving(server, client) -> None:
    assert client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).choices
    server.assert_clean()


@pytest.mark.parametrize("path, body, status, param, words", BAD_REQUESTS,
                         ids=[f"{i}-{c[3]}" for i, c in enumerate(BAD_REQUESTS)])
def test_bad_request(server, client, http, path, body, status, param, words):
    check_error(http.post(path, json=body), status, param, words)
    check_error(http.post(path, json=body | {"stream": True}), status, param, words)
    still_serving(server, client)


@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "x", "max_tokens": 3', ["JSON"]),
    (b'\xff\xfe{"prompt": "x"}', ["UTF-8"]),
    ('{"prompt": "caf\u00e9"}'.encode("latin-1"), ["UTF-8"]),
    (b'{"prompt": "x", "temperature": NaN}', ["JSON"]),
    (b'["x"]', ["object"]),
    (b"", ["JSON"]),
])
def test_malformed_body(server, client, http, raw, words):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        check_error(http.post(path, content=raw, headers={"content-type": "application/json"}),
                    400, None, words)
    still_serving(server, client)


def test_openai_client_raises_typed_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT, max_tokens=200,
                                  stream=True)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong",
                      max_retries=0).models.list()
    still_serving(server, client)


def test_api_key_guards_v1_only(server, client):
    with httpx.Client(base_url=server.url) as anonymous:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions")):
            check_error(anonymous.request(method, path, json={"prompt": "x"}), 401, None)
        assert anonymous.get("/health").status_code == 200
        check_error(anonymous.get("/no/such/route"), 404)
    still_serving(server, client)


def test_error_bodies_stay_short(server, client, http):
    huge = "z" * 100_000
    for path, body in (("/v1/completions", {"model": huge, "prompt": "x"}),
                       ("/v1/completions", {"prompt": "x", "stop": [huge, ""]}),
                       ("/v1/completions", {"prompt": "x", "max_tokens": huge}),
                       ("/v1/chat/completions", {"messages": [{"role": huge}]}),
                       ("/v1/completions", {"prompt": [huge, 5]})):
        response = http.post(path, json=body)
        assert response.status_code in (400, 404)
        assert len(response.content) < 600, response.text[:1000]
    still_serving(server, client)


def test_sse_wire_format(http):
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": MESSAGES, "max_tokens": 4, "n": 2, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert [c["choices"][0]["delta"]["role"] for c in chunks[:2]] == ["assistant"] * 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])
    finished = [ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert sorted(finished) == [0, 1]


def test_chat_template_override(server, http, offline, monkeypatch, tmp_path):
    from loom.server.launch import read_chat_template

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>"
    (tmp_path / "t.jinja").write_text(template)
    assert read_chat_template(str(tmp_path / "t.jinja")) == template == read_chat_template(template)
    with pytest.raises(ValueError, match="chat-template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    monkeypatch.setattr(server.app.state.serving.settings, "chat_template", template)
    got = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert got == offline.apply_chat_template(MESSAGES, chat_template=template)


def test_skip_tokenizer_init_serves_token_ids(tiny_models, offline):
    ids = offline.get_tokenizer().encode(PROMPTS[1])
    expected = offline.generate([ids], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    s = LiveServer(tiny_models["llama"], skip_tokenizer_init=True, **CONFIG)
    try:
        client = s.client()
        kw = dict(model=MODEL_NAME, prompt=ids, max_tokens=12, temperature=0,
                  extra_body={"return_token_ids": True})
        whole = client.completions.create(**kw).choices[0]
        assert whole.model_extra["token_ids"] == expected and whole.text == ""
        streamed = [t for chunk in client.completions.create(stream=True, **kw)
                    for c in chunk.choices for t in c.model_extra["token_ids"]]
        assert streamed == expected
        with s.http() as http:
            for path, body, param in (("/v1/completions", {"prompt": "text"}, "prompt"),
                                      ("/v1/chat/completions", {"messages": MESSAGES}, "messages"),
                                      ("/v1/completions", {"prompt": ids, "stop": ["x"]}, "stop"),
                                      ("/tokenize", {"prompt": "text"}, "prompt")):
                check_error(http.post(path, json=body), 400, param, ["skip-tokenizer-init"])
        s.assert_clean()
    finally:
        s.stop()


def test_engine_core_in_a_thread(tiny_models, offline):
    """--engine-core thread serves the same: greedy text as offline, n=2 streaming with a stop
    string, and a client that hangs up frees its blocks."""
    expected = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    s = LiveServer(tiny_models["llama"], engine_core="thread", **CONFIG)
    try:
        client = s.client()
        whole = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=12,
                                          temperature=0)
        assert [c.text for c in whole.choices] == [o.outputs[0].text for o in expected]
        text = expected[1].outputs[0].text
        stop = text[4:7]
        texts, reasons, _ = stream_text(client.completions.create(
            model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0, n=2,
            stop=[stop], stream=True))
        assert texts == {0: text[:text.find(stop)], 1: text[:text.find(stop)]}
        assert reasons == {0: "stop", 1: "stop"}
        s.set_step_delay(0.01)
        with s.http() as http, http.stream("POST", "/v1/completions", json={
                "model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 200, "stream": True,
                "ignore_eos": True}) as response:
            assert next(response.iter_lines()).startswith("data: ")
        assert s.wait_idle(timeout=3.0) < 1.0
        s.assert_clean()
    finally:
        s.stop()
