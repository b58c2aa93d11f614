"""A reader that falls behind the engine gets its request's waiting outputs merged: one SSE event
for many tokens, with exactly the text, token ids, logprobs, finish reason and usage it would
have got one token at a time. The front end then also handles the engine core's steps that
waited as one batch. And, without a server, the merge of deltas and the per-request inbox."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install loom[server])")

import asyncio
import json
import time

from live_server import MODEL_NAME, LiveServer, one_torch_thread
from loom import LLM, SamplingParams
from loom.async_engine import StreamInbox, merge_deltas
from loom.outputs import CompletionOutput, Logprob, RequestOutput
from loom.server.protocol import ChatRequest, CompletionRequest

CONFIG = dict(max_model_len=128, max_num_seqs=8)
PROMPTS = ["The quick brown fox", "Once upon a time there was a little town by the sea"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 24
BLOCK_S = 0.3          # the event loop blocked this long: the core steps many times meanwhile

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def server(tiny_models):
    s = LiveServer(tiny_models["llama"], **CONFIG)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(tiny_models):
    return LLM(str(tiny_models["llama"]), dtype="float32", **CONFIG)


def read_slowly(server, events_of) -> tuple[list[dict], list[int]]:
    """On the server's event loop: the first SSE event of ``await events_of(serving)``; then
    the loop is blocked for a while and the reader waits until the engine has finished every
    request; then the rest. Returns the parsed chunks and how many steps each batch of the
    engine core's outputs held."""
    engine = server.async_engine
    batches = []
    handle = engine._on_step_outputs

    def spy(steps):
        batches.append(len(steps))
        handle(steps)

    async def run():
        events = aiter(await events_of(server.app.state.serving))
        first = await anext(events)
        time.sleep(BLOCK_S)                 # a busy event loop: nothing is read meanwhile
        while engine.outputs.groups:
            await asyncio.sleep(0.01)
        return [first] + [e async for e in events]

    engine._on_step_outputs = spy
    try:
        texts = asyncio.run_coroutine_threadsafe(run(), engine._loop).result(60)
    finally:
        del engine._on_step_outputs
    assert texts[-1] == "data: [DONE]\n\n"
    return [json.loads(t.removeprefix("data: ")) for t in texts[:-1]], batches


def by_choice(chunks: list[dict]) -> dict[int, list[dict]]:
    out = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            out.setdefault(c["index"], []).append(c)
    return out


def test_slow_reader_completions_two_prompts_logprobs(server, offline):
    body = dict(model=MODEL_NAME, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0,
                logprobs=2, return_token_ids=True)
    chunks, batches = read_slowly(server, lambda serving: serving.completions(
        CompletionRequest(stream=True, stream_options={"include_usage": True}, **body)))
    assert max(batches) > 1, "the steps that waited were not handled as one batch"
    whole = server.app.state.serving     # the same request, not streamed, as reference
    reference = asyncio.run_coroutine_threadsafe(whole.completions(CompletionRequest(**body)),
                                                 server.async_engine._loop).result(60)
    expected = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                                use_tqdm=False)
    choices = by_choice(chunks)
    assert sorted(choices) == [0, 1]
    for i, pieces in choices.items():
        assert len(pieces) <= 3 < MAX_TOKENS          # merged, not one event per token
        token_ids = [t for p in pieces for t in p["token_ids"]]
        assert token_ids == expected[i].outputs[0].token_ids
        assert "".join(p["text"] for p in pieces) == expected[i].outputs[0].text
        assert [p["finish_reason"] for p in pieces][-1] == "length"
        assert sum(p["finish_reason"] is not None for p in pieces) == 1
        for p in pieces:                              # each event's logprobs fit its tokens
            assert len(p["logprobs"]["tokens"]) == len(p["token_ids"])
        joined = {key: [v for p in pieces for v in p["logprobs"][key]]
                  for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        whole = reference["choices"][i]["logprobs"]       # the batches differ: floats are close
        assert joined["tokens"] == whole["tokens"] and joined["text_offset"] == whole["text_offset"]
        assert joined["token_logprobs"] == pytest.approx(whole["token_logprobs"], abs=1e-5)
        for got, want in zip(joined["top_logprobs"], whole["top_logprobs"], strict=True):
            assert got == pytest.approx(want, abs=1e-5)
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage == reference["usage"]
    assert usage["completion_tokens"] == 2 * MAX_TOKENS
    server.assert_clean()


def test_slow_reader_chat_n2_stop_string(server, offline):
    sequence = offline.generate([offline.apply_chat_template(MESSAGES)],
                                SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                                use_tqdm=False)[0].outputs[0]
    stop = sequence.text[10:13]                        # ends both (greedy) sequences early
    expected = sequence.text[:sequence.text.index(stop)]
    chunks, _ = read_slowly(server, lambda serving: serving.chat(ChatRequest(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, n=2,
        stop=[stop], logprobs=True, stream=True, stream_options={"include_usage": True})))
    choices = by_choice(chunks)
    num_tokens = 0
    for i in (0, 1):
        pieces = choices[i]
        assert pieces[0]["delta"] == {"role": "assistant", "content": ""}
        assert len(pieces) <= 4
        assert "".join(p["delta"].get("content", "") for p in pieces) == expected
        assert [p["finish_reason"] for p in pieces if p["finish_reason"]] == ["stop"]
        assert pieces[-1]["stop_reason"] == stop
        num_tokens += sum(len(p["logprobs"]["content"]) for p in pieces if p["logprobs"])
    assert chunks[-1]["usage"]["completion_tokens"] == num_tokens
    assert num_tokens < 2 * MAX_TOKENS
    server.assert_clean()


# ---- without a server ----------------------------------------------------------------------------
def delta(tokens: dict[int, list[int]], finish: dict[int, str] | None = None,
          finished: bool = False) -> RequestOutput:
    """A delta of request "r": per sequence index, new tokens (text "<id>", logprob -id)."""
    finish = finish or {}
    return RequestOutput("r", "p", [1, 2], [
        CompletionOutput(i, "".join(f"<{t}>" for t in ids), ids, finish.get(i), None,
                         [{t: Logprob(-t, 1)} for t in ids], -sum(ids))
        for i, ids in tokens.items()], finished, metrics={"last": tokens})


def test_merge_deltas_joins_each_sequence():
    parts = [delta({0: [1], 1: [2]}), delta({1: [3, 4]}), delta({0: [5]}, {0: "length"}),
             delta({1: [6]}, {1: "stop"}, finished=True)]
    merged = merge_deltas(parts)
    assert merged.finished and merged.metrics == {"last": {1: [6]}}
    first, second = merged.outputs
    assert (first.index, first.text, first.token_ids, first.finish_reason) == (
        0, "<1><5>", [1, 5], "length")
    assert (second.index, second.text, second.token_ids, second.finish_reason) == (
        1, "<2><3><4><6>", [2, 3, 4, 6], "stop")
    assert [list(e) for e in second.logprobs] == [[2], [3], [4], [6]]
    assert second.cumulative_logprob == -6                  # the latest, not a sum


def test_stream_inbox_merges_wakes_and_fails():
    async def run():
        inbox = StreamInbox()
        inbox.put(delta({0: [1]}))
        inbox.put(delta({0: [2]}))
        assert (await inbox.take()).outputs[0].token_ids == [1, 2]

        inbox.wake_on_finish = True           # a reader of the whole result only
        reader = asyncio.ensure_future(inbox.take())
        inbox.put(delta({0: [3]}))
        await asyncio.sleep(0)
        assert not reader.done()
        inbox.put(delta({0: [4]}, {0: "length"}, finished=True))
        out = await reader
        assert out.finished and out.outputs[0].token_ids == [3, 4]

        inbox.put(delta({0: [5]}))
        inbox.fail(RuntimeError("engine gone"))
        with pytest.raises(RuntimeError, match="engine gone"):
            await inbox.take()

    asyncio.run(run())
