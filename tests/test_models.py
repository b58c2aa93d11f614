"""loom's Llama-family models against Hugging Face transformers, on flat paged batches."""
from __future__ import annotations

import pytest
import torch

from loom.attention import AttentionMetadata
from loom.loader import load_model
from loom.model_config import ModelConfig
from loom.models.llama import LlamaForCausalLM
from loom.plugins.attention.torch_ref import TorchRefAttention
from loom.plugins.quant.unquantized import Unquantized

BLOCK_SIZE = 4
NUM_BLOCKS = 64
PROMPT_LENS = (7, 33, 2)


def make_metadata(block_tables: list[list[int]], num_computed: list[int], num_new: list[int],
                  num_decodes: int = 0) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata and positions of one step: sequence i has ``num_computed[i]`` tokens cached
    and runs ``num_new[i]`` new ones (the first ``num_decodes`` sequences run one each)."""
    seq_lens = [c + n for c, n in zip(num_computed, num_new)]
    starts = [0]
    for n in num_new:
        starts.append(starts[-1] + n)
    positions = [p for c, s in zip(num_computed, seq_lens) for p in range(c, s)]
    slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
             for table, c, s in zip(block_tables, num_computed, seq_lens) for p in range(c, s)]
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    query_start_loc = torch.tensor(starts, dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    metadata = AttentionMetadata(
        num_seqs=len(seq_lens), num_decodes=num_decodes, num_tokens=starts[-1],
        max_query_len=max(num_new), max_seq_len=max(seq_lens),
        query_start_loc=query_start_loc, seq_lens=seq_lens_t, block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens_t, block_size=BLOCK_SIZE)
    return metadata, torch.tensor(positions, dtype=torch.int64)


def allocate_blocks(prompt_lens, seed=0) -> list[list[int]]:
    """Distinct, shuffled blocks for each sequence."""
    pool = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = []
    for n in prompt_lens:
        count = -(-n // BLOCK_SIZE)
        tables.append(pool[:count])
        pool = pool[count:]
    return tables


def load_loom(path):
    config = ModelConfig.from_dir(path)
    backend = TorchRefAttention(config.num_attention_heads, config.num_key_value_heads,
                                config.head_dim, config.head_dim ** -0.5, torch.float32,
                                torch.device("cpu"))
    model = load_model(config, LlamaForCausalLM, Unquantized(), backend, torch.float32, "cpu")
    shape = backend.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads,
                                   config.head_dim)
    kv_caches = [torch.zeros(shape) for _ in range(config.num_hidden_layers)]
    return model, kv_caches, config


def make_prompts(vocab_size, lens=PROMPT_LENS) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lens]


def run_step(model, kv_caches, prompts, tables, num_computed, num_new, num_decodes=0):
    metadata, positions = make_metadata(tables, num_computed, num_new, num_decodes)
    ids = [t for p, c, n in zip(prompts, num_computed, num_new) for t in p[c:c + n]]
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), positions, kv_caches, metadata)
        return model.compute_logits(hidden)


@pytest.fixture(scope="module")
def hf_logits(tiny_models):
    """name -> per-prompt HF logits [len, vocab], computed once per model."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(name, prompts):
        if name not in cache:
            hf = AutoModelForCausalLM.from_pretrained(tiny_models[name], dtype=torch.float32)
            with torch.inference_mode():
                cache[name] = [hf(torch.tensor([p])).logits[0] for p in prompts]
        return cache[name]
    return get


def test_prefill_matches_hf(tiny_models, hf_logits, tiny_model_name):
    name = tiny_model_name
    model, kv_caches, config = load_loom(tiny_models[name])
    prompts = make_prompts(config.vocab_size)
    logits = run_step(model, kv_caches, prompts, allocate_blocks(PROMPT_LENS),
                      [0] * len(prompts), list(PROMPT_LENS))
    expected = torch.cat(hf_logits(name, prompts))
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["llama", "llama3", "qwen2", "qwen3"])
def test_cached_prefix_matches_hf(tiny_models, hf_logits, name):
    """Prefill a prefix of each prompt, then the rest against the cache (the last prompt's
    rest is a single token, run as a decode, first in the batch)."""
    model, kv_caches, config = load_loom(tiny_models[name])
    prompts = make_prompts(config.vocab_size)
    tables = allocate_blocks(PROMPT_LENS)
    first = [5, 20, 1]
    run_step(model, kv_caches, prompts, tables, [0, 0, 0], first)
    order = [2, 0, 1]  # decodes first
    rest = [PROMPT_LENS[i] - first[i] for i in order]
    logits = run_step(model, kv_caches, [prompts[i] for i in order], [tables[i] for i in order],
                      [first[i] for i in order], rest, num_decodes=1)
    full = hf_logits(name, prompts)
    expected = torch.cat([full[i][first[i]:] for i in order])
    assert (logits - expected).abs().max().item() < 1e-4
