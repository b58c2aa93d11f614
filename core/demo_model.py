"""Tiny, real Hugging Face model directories: the ``loom-demo`` model and the test models.

Weights come from transformers itself (random, seeded), the tokenizer is a byte-level BPE
trained here on a short English text, so no download is ever needed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

DEMO_NAME = "demo-llama-v1"
TINY_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, head_dim=16,
                  max_position_embeddings=2048)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # small, so the tiny head_dim sees low, medium and high frequencies
               "original_max_position_embeddings": 64}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and
predicts the next one. Paged attention stores the keys and values of every sequence in fixed
size blocks, so memory is not wasted on padding. The scheduler batches many requests together
and runs them step by step, while new requests arrive and finished ones leave.
Once upon a time there was a little town by the sea. Every morning the fishermen went out in
their boats, and every evening they came back with stories of the wind, the waves and the birds.
The children ran along the beach, the bakers opened their shops, and the old clock on the tower
rang the hours of the day. What is the capital of France? The capital of France is Paris.
How many days are in a week? There are seven days in a week. Please write a short poem about
the moon. The moon is bright tonight, it shines on the water and on the quiet hills.
User: Hello, who are you? Assistant: I am a small demo model. I know very little, but I answer
quickly. Thank you for your question, and have a nice day.
"""


def build_tiny_model(path: str | Path, arch: str = "llama", *, seed: int = 0,
                     max_shard_size: str | None = None, **config_overrides) -> Path:
    """Write a tiny HF model directory (config, safetensors, tokenizer, generation config).

    ``arch``: llama, llama3 (llama3 rope scaling), mistral, qwen2 or qwen3. Keyword arguments
    override config fields; ``max_shard_size`` (e.g. "100KB") writes a sharded checkpoint.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    config = _hf_config(arch, tokenizer, config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize(model)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    tokenizer.save_pretrained(path)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=[config.eos_token_id],
                     pad_token_id=config.pad_token_id).save_pretrained(path)
    return path


def ensure_demo_model() -> Path:
    """The ``loom-demo`` model: built once under $LOOM_CACHE_DIR (default ~/.cache/loom)."""
    root = Path(os.environ.get("LOOM_CACHE_DIR") or Path.home() / ".cache" / "loom")
    final = root / DEMO_NAME
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=root))
    try:
        build_tiny_model(tmp, "llama")
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():  # not a concurrent builder that won
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _hf_config(arch: str, tokenizer, overrides: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "llama3": LlamaConfig, "mistral": MistralConfig,
               "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if arch not in classes:
        raise ValueError(f"unknown tiny model arch {arch!r}; known: {', '.join(classes)}")
    values = dict(TINY_SIZES, vocab_size=len(tokenizer),
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if arch == "llama3":
        values["rope_parameters"] = dict(LLAMA3_ROPE)
    values.update(overrides)
    return classes[arch](**values)


def _randomize(model: torch.nn.Module) -> None:
    """Weights of unit-scale activations (HF's 0.02 init gives near-constant logits); norms
    and biases random too, so a misplaced tensor shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)
