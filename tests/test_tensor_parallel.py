"""Tensor parallelism on the CPU: 2 ranks as 2 processes over gloo, against one rank.

The two ranks are set up once for the module: this process is rank 0 and a spawned child is
rank 1, running the worker loop; every tensor-parallel engine of the module runs on them in turn
(a session each), as under torchrun. Greedy tokens must equal the single-rank engine's, token
for token, and logprobs agree in float32, for every tiny architecture, one with fewer KV heads
than ranks, and quantized checkpoints (GPTQ with act order, compressed-tensors with act order,
AWQ, FP8).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loom import LLM, SamplingParams
from loom.config import ConfigError
from loom.demo_model import build_tiny_model
from loom.distributed import messages
from loom.distributed import world as tp_world

QUANT = Path(__file__).parent / "fixtures" / "quant"
PROMPTS = ["The quick brown fox",
           "Once upon a time there was a little town by the sea, and every morning",
           "What is the capital of France?"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, logprobs=2)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=10)
# Small steps: prompts are chunked and share steps with decodes; async scheduling feeds each
# step's sampled tokens to the next on the device, on every rank.
CONFIG = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16,
              kv_cache_memory_gb=0.01)


@pytest.fixture(scope="module", autouse=True)
def two_ranks():
    world = tp_world.spawn(2, "gloo")
    yield world
    world.close(exit_message=messages.EXIT)


def run(path: Path, tensor_parallel_size: int, **config):
    """(token ids, logprobs of the greedy tokens) per prompt, then those of the seeded one."""
    llm = LLM(str(path), tensor_parallel_size=tensor_parallel_size, **(CONFIG | config))
    try:
        greedy = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        seeded = llm.generate(PROMPTS[1], SEEDED, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    completions = [o.outputs[0] for o in greedy]
    return ([c.token_ids for c in completions] + [seeded[0].outputs[0].token_ids],
            [[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in completions])


def assert_same_as_one_rank(path: Path, logprob_tolerance: float = 1e-4, **config) -> None:
    tokens, logprobs = run(path, 1, **config)
    tp_tokens, tp_logprobs = run(path, 2, **config)
    assert tp_tokens == tokens
    for one, two in zip(logprobs, tp_logprobs):
        assert max(abs(a - b) for a, b in zip(one, two)) < logprob_tolerance


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory) -> Path:
    """4 query heads sharing 1 KV head: each of the 2 ranks keeps a copy of it."""
    return build_tiny_model(tmp_path_factory.mktemp("kv1") / "llama", "llama",
                            num_key_value_heads=1)


def test_greedy_equals_one_rank(tiny_models, tiny_model_name):
    assert_same_as_one_rank(tiny_models[tiny_model_name])


def test_fewer_kv_heads_than_ranks(one_kv_head):
    assert_same_as_one_rank(one_kv_head)


@pytest.mark.parametrize("name", ["gptq_w4g32_sym_descact", "ct_w4a16_g32_actorder_group",
                                  "awq_w4g64"])
def test_weight_only_quantized_equals_one_rank(name):
    """Act-order g_idx on the row-parallel o/down (each rank keeps every group), AWQ's packing
    split by whole words."""
    assert_same_as_one_rank(QUANT / name)


def test_fp8_equals_one_rank():
    """FP8 weights with per-tensor scales and a static input scale, shared by the ranks. The
    activations go through fp8 rounding: float noise of the all-reduce flips a rare one by a
    step, which moves logprobs by far more than float noise (tokens stay equal)."""
    assert_same_as_one_rank(QUANT / "ct_fp8_static", logprob_tolerance=0.05)


def test_a_layout_that_cannot_be_split_fails_at_start(tiny_models):
    """128x128 FP8 blocks: a rank's 64 query rows would cut a block in two. Both ranks refuse
    the session; the ranks then serve the next one."""
    with pytest.raises(ValueError, match=r"qkv_proj: cannot be sharded for rank 0 of "
                                         r"tensor-parallel-size 2.*align with its 128"):
        LLM(str(QUANT / "ct_fp8_block"), tensor_parallel_size=2, **CONFIG)
    assert_same_as_one_rank(tiny_models["llama"])


def test_tensor_parallel_size_must_split_the_heads(tiny_models):
    with pytest.raises(ConfigError, match=r"'tensor-parallel-size': 3 does not split this model "
                                          r"evenly \(4 attention heads, 2 KV heads, MLP size "
                                          r"128\); use one of 1, 2, 4"):
        LLM(str(tiny_models["llama"]), tensor_parallel_size=3, **CONFIG)


def test_the_same_command_under_torchrun(tiny_models):
    """`torchrun --nproc-per-node 2 loom generate`: each process one rank (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT from torchrun), rank 0 the engine, rank 1 the worker loop."""
    path = tiny_models["llama"]
    args = ["generate", str(path), "--tensor-parallel-size", "2", "--dtype", "float32",
            "--max-model-len", "128", "--kv-cache-memory-gb", "0.01", "--prompt", PROMPTS[1],
            "--max-tokens", "10", "--json", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "loom.cli", "--log-level", "WARNING",
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1                       # rank 1 prints nothing
    tokens, _ = run(path, 1)
    assert lines[0]["token_ids"] == tokens[1]


@pytest.fixture(scope="module")
def long_context(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("long") / "llama", "llama",
                            max_position_embeddings=8192)


def test_a_step_larger_than_one_broadcast(long_context):
    """A prompt of more token ids than one control broadcast holds: the rest follows in a
    second one."""
    prompt = [(i * 7919) % 400 + 4 for i in range(tp_world.HEADER // 4 + 100)]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=1)
    config = CONFIG | dict(max_model_len=len(prompt) + 8, max_num_batched_tokens=len(prompt),
                           kv_cache_memory_gb=0.05)
    outputs = []
    for size in (1, 2):
        llm = LLM(str(long_context), tensor_parallel_size=size, **config)
        try:
            outputs.append(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0])
        finally:
            llm.engine.shutdown()
    assert outputs[0].token_ids == outputs[1].token_ids
    lp = [[step[t].logprob for step, t in zip(o.logprobs, o.token_ids)] for o in outputs]
    assert max(abs(a - b) for a, b in zip(*lp)) < 1e-4
