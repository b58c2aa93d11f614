"""The engine core's serving loop (core_loop.serve) with an in-memory transport: the same
tokens as the offline engine, one StepOutputs per step, refused requests, finished sequences,
utility calls, and Shutdown aborting what still runs. Every message survives pickling, as it
must to cross into the core's process."""
from __future__ import annotations

import pickle

import torch

from loom import LLM, SamplingParams
from loom.config import build_config
from loom.core_loop import (Finish, Shutdown, StepOutputs, Stopped, UtilityCall, UtilityResult,
                            serve)
from loom.engine_core import CoreRequest, EngineCore
from loom.request import RequestStatus

CONFIG = dict(dtype="float32", max_model_len=64)
PROMPT = [5, 17, 42, 99, 7]


def run(core: EngineCore, script: dict[int, list]) -> list:
    """Serve ``script`` (steps done so far -> messages the core then receives; Shutdown should
    be among them); every message the core sent, through pickle."""
    sent, steps = [], [0]

    def receive(block: bool):
        due = script.get(steps[0], [])
        if due:
            return pickle.loads(pickle.dumps(due.pop(0)))
        assert not block, "the script ended without Shutdown"
        return None

    def send(message) -> None:
        if isinstance(message, StepOutputs) and message.updates:
            steps[0] += 1
        sent.append(pickle.loads(pickle.dumps(message)))

    serve(core, receive, send)
    return sent


def test_serve_loop(tiny_models):
    torch.set_num_threads(1)
    path = str(tiny_models["llama"])
    expected = LLM(path, **CONFIG).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    core = EngineCore(build_config({"model": path} | CONFIG))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    sent = run(core, {
        0: [CoreRequest("a", PROMPT, greedy), CoreRequest("bad", [], greedy),
            CoreRequest("long", PROMPT, SamplingParams(max_tokens=40, n=2, ignore_eos=True)),
            UtilityCall(1, "stats"), UtilityCall(2, "_complete"), UtilityCall(3, "no_such")],
        2: [Finish(["long-0"], RequestStatus.FINISHED_ABORTED)],
        10: [Shutdown()]})

    steps = [m for m in sent if isinstance(m, StepOutputs)]
    assert steps[0].rejected == {"bad": "prompt: must not be empty"}
    tokens, finish = {}, {}
    for step in steps:
        for u in step.updates:
            tokens.setdefault(u.seq_id, []).extend(u.new_token_ids)
            finish[u.seq_id] = u.finish_reason
    assert tokens["a"] == expected and finish["a"] == "length"
    assert set(tokens) == {"a", "long-0", "long-1"}          # n=2: one id per sequence
    assert len(tokens["long-0"]) < 40 and finish["long-0"] is None   # finished from outside
    assert steps[-1].stats.num_running == 1                 # long-1 still runs at Shutdown

    results = {m.call_id: m for m in sent if isinstance(m, UtilityResult)}
    assert results[1].error is None and results[1].result.num_requests == 3
    assert "no method '_complete'" in results[2].error and "no_such" in results[3].error

    stopped = sent[-1]
    assert isinstance(stopped, Stopped) and stopped.num_aborted == 1
    assert stopped.stats.num_requests == 0
    assert stopped.stats.num_free_blocks == stopped.stats.num_blocks


def test_serve_loop_carries_speculation_counts(tiny_models):
    """With speculative decoding (the target as its own draft: every draft accepted), each
    SequenceUpdate carries the sequence's draft and accepted token counts and each StepOutputs
    the scheduler's running totals: plain data the front end's metrics read after pickling."""
    torch.set_num_threads(1)
    path = str(tiny_models["llama"])
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = LLM(path, **CONFIG).generate([PROMPT], greedy, use_tqdm=False)[0]
    speculative = {"method": "draft", "num-speculative-tokens": 3, "model": path}
    core = EngineCore(build_config({"model": path, "speculative": speculative} | CONFIG))
    assert core.info().speculative
    inbox = [CoreRequest("a", PROMPT, greedy)]
    sent = []

    def receive(block: bool):
        if inbox:
            return pickle.loads(pickle.dumps(inbox.pop(0)))
        return Shutdown() if block else None      # blocking: nothing runs any more

    serve(core, receive, lambda message: sent.append(pickle.loads(pickle.dumps(message))))
    updates = [u for m in sent if isinstance(m, StepOutputs) for u in m.updates]
    assert [t for u in updates for t in u.new_token_ids] == expected.outputs[0].token_ids
    drafts = [u.num_draft_tokens for u in updates]
    assert drafts == sorted(drafts) and drafts[-1] > 0
    assert all(u.num_accepted_tokens == u.num_draft_tokens for u in updates)
    totals = [m.stats.spec_decode for m in sent if isinstance(m, StepOutputs)][-1]
    assert totals.num_draft_tokens == drafts[-1] == totals.num_accepted_tokens
