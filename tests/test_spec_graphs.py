"""The graph path of speculative decoding on the CPU: the triton attention backend through
triton's interpreter, and a stand-in for device graphs that reruns the captured forward on
replay, over the same persistent buffers. Decode graphs, verification graphs (k + 1 tokens per
sequence, padded batches) and the draft model's graphs give plain decoding's tokens."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest

from triton_interpreter import DEVICE  # noqa: F401  (sets TRITON_INTERPRET before the kernels)

from loom import LLM, SamplingParams  # noqa: E402
from loom.cuda_graphs import DecodeGraphs  # noqa: E402

PROMPTS = ["The quick brown fox", "What is the capital of France?"]


class ReplayGraph:
    """Replays by running the captured forward again into the captured output tensor."""

    def __init__(self):
        self.forward = None
        self.out = None

    def replay(self):
        self.out.copy_(self.forward())

    class NoEvent:
        def record(self):
            pass

        def synchronize(self):
            pass


@pytest.fixture
def fake_graphs(monkeypatch):
    """The CPU platform claims graphs; DecodeGraphs captures ReplayGraphs."""
    from loom.plugins.platform.cpu import CpuPlatform
    capturing = []

    @contextmanager
    def capture(self, graph, pool, stream):
        capturing.append(graph)
        yield
        capturing.pop()

    forward = DecodeGraphs._forward

    def recording_forward(self, size, metadata):
        out = forward(self, size, metadata)
        if capturing:
            graph = capturing[-1]
            graph.forward, graph.out = (lambda: forward(self, size, metadata)), out
        return out

    monkeypatch.setattr(CpuPlatform, "supports_graphs", True)
    monkeypatch.setattr(CpuPlatform, "make_graph", lambda self: ReplayGraph(), raising=False)
    monkeypatch.setattr(CpuPlatform, "graph_pool", lambda self: None, raising=False)
    monkeypatch.setattr(CpuPlatform, "graph_capture", lambda self: nullcontext(), raising=False)
    monkeypatch.setattr(CpuPlatform, "capture", capture, raising=False)
    monkeypatch.setattr(DecodeGraphs, "_forward", recording_forward)
    init = DecodeGraphs.__init__

    def init_without_events(self, *args):
        init(self, *args)
        self.copied = ReplayGraph.NoEvent()       # the CPU has no device events
    monkeypatch.setattr(DecodeGraphs, "__init__", init_without_events)
    replays = []
    run = DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run",
                        lambda self, hb: replays.append((self.query_len, hb.num_seqs))
                        or run(self, hb))
    return replays


def test_verify_and_draft_graphs_give_plain_tokens(tiny_models, fake_graphs):
    path = tiny_models["llama"]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (7, 4)]
    plain = LLM(str(path), dtype="float32", max_model_len=64, enforce_eager=True)
    expected = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    llm = LLM(str(path), dtype="float32", max_model_len=64, max_num_seqs=2,
              max_num_batched_tokens=64, attention_backend="triton", cuda_graph_sizes=[2],
              speculative={"method": "draft", "num-speculative-tokens": 2, "model": str(path)})
    runner = llm.engine.executor.runner
    draft = llm.engine.proposer.runner
    assert runner.spec_graphs.sizes == [2] and runner.spec_graphs.query_len == 3
    assert draft.spec_graphs is not None and draft.graphs is not None
    fake_graphs.clear()
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert got == expected
    assert llm.spec_decode_stats.acceptance_rate > 0.9
    # Verification of both sequences, then of one padded to two; the draft's pass over the
    # same batches and its proposal steps on decode graphs.
    assert {(3, 2), (3, 1), (1, 2), (1, 1)} <= set(fake_graphs)
