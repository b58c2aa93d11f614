"""On a GPU (`pytest -m gpu`): the flashinfer and flash_attn backends end to end, against the
torch_ref backend on a small bf16 model (head size 64, which every build of both packages has).
Each is skipped where its package is not installed: `loom plugins` says what is missing."""
import pytest
import torch

from loom import LLM, SamplingParams
from loom.demo_model import build_tiny_model
from loom.plugin_manager import get_plugin_manager

pytestmark = pytest.mark.gpu

PROMPTS = ["The quick brown fox", "Once upon a time there was a little town by the sea",
           "What is the capital of France?", "Paged attention stores the keys and values " * 20]
SIZES = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             intermediate_size=512)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    return build_tiny_model(tmp_path_factory.mktemp("hd64") / "llama3", "llama3", **SIZES)


def run(path, backend, **config):
    base = dict(dtype="bfloat16", max_model_len=1024, max_num_seqs=16, kv_cache_memory_gb=1.0)
    llm = LLM(str(path), attention_backend=backend, **(base | config))
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    second = llm.generate(PROMPTS, params, use_tqdm=False)        # prefix-cache hits
    engine = llm.engine
    del llm
    return outs, second, engine


def agreement(ref, fast) -> int:
    """Positions compared. Greedy tokens must be equal until a bf16 near-tie flips one: where
    they first differ, the reference must rank the fast path's token second and within 0.1 of
    its first; before that, the logprobs of the equal tokens agree to 0.05."""
    compared = 0
    for r, f in zip(ref, fast):
        rt, ft = r.outputs[0].token_ids, f.outputs[0].token_ids
        for pos, (a, b) in enumerate(zip(rt, ft)):
            ref_top = r.outputs[0].logprobs[pos]
            if a != b:
                assert b in ref_top and ref_top[a].logprob - ref_top[b].logprob < 0.1, (
                    f"position {pos}: token {b} is no near-tie of the reference's {a}: {ref_top}")
                break
            assert abs(ref_top[a].logprob - f.outputs[0].logprobs[pos][b].logprob) < 0.05
            compared += 1
    return compared


@pytest.mark.parametrize("backend", ["flashinfer", "flash_attn"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_backend_matches_torch_ref(model, backend, chunked):
    cls = get_plugin_manager().get("attention_backend", backend)
    if cls.unavailable:
        pytest.skip(cls.unavailable)
    extra = {"max_num_batched_tokens": 64} if chunked else {}
    block = {"block_size": cls.required_block_size} if cls.required_block_size else {}
    ref, _, _ = run(model, "torch", fused_ops="torch", enforce_eager=True, **block, **extra)
    fast, again, engine = run(model, backend, **extra)
    assert engine.executor.runner.graphs is not None, "decode graphs were not captured"
    assert engine.kv_cache.prefix_hits > 0
    assert agreement(ref, fast) >= 32       # a whole prompt's worth of positions
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in fast]
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
