"""Model directories: config parsing, checkpoints, tokenizers, dummy weights and every error."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom.loader import (iterate_weights, load_generation_config, load_model, load_tokenizer,
                         safetensors_files)
from loom.model_config import ModelConfig
from loom.models.llama import LlamaForCausalLM
from loom.plugins.attention.torch_ref import TorchRefAttention
from loom.plugins.quant.unquantized import Unquantized


def load(config: ModelConfig, load_format="auto", seed=0):
    backend = TorchRefAttention(config.num_attention_heads, config.num_key_value_heads,
                                config.head_dim, config.head_dim ** -0.5, torch.float32,
                                torch.device("cpu"))
    return load_model(config, LlamaForCausalLM, Unquantized(), backend, torch.float32, "cpu",
                      load_format, seed=seed)


def copy_model(src, dst, *, weights=True):
    """A copy of a model dir, without its *.safetensors when ``weights`` is false."""
    ignore = None if weights else shutil.ignore_patterns("*.safetensors", "*.index.json")
    return shutil.copytree(src, dst, ignore=ignore)


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


# ---- checkpoints -----------------------------------------------------------------------------
def test_sharded_and_single_checkpoints_load_the_same(tiny_models):
    single, sharded = tiny_models["llama"], tiny_models["llama_sharded"]
    assert len(safetensors_files(sharded)) > 1
    assert (sharded / "model.safetensors.index.json").is_file()
    a = load(ModelConfig.from_dir(single)).state_dict()
    b = load(ModelConfig.from_dir(sharded)).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings_share_the_weight(tiny_models):
    model = load(ModelConfig.from_dir(tiny_models["llama_tied"]))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dummy_weights_need_only_config_json(tiny_models, tmp_path):
    (tmp_path / "config.json").write_text((tiny_models["llama"] / "config.json").read_text())
    config = ModelConfig.from_dir(tmp_path)
    a, b = load(config, "dummy", seed=3), load(config, "dummy", seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        if "norm" in name:
            assert torch.all(p == 1), name
        else:
            assert p.abs().max() <= p.shape[-1] ** -0.5, name
    assert not torch.equal(a.lm_head.weight, load(config, "dummy", seed=4).lm_head.weight)


def test_unexpected_checkpoint_tensor_is_an_error(tiny_models, tmp_path):
    path = copy_model(tiny_models["llama"], tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra_proj.weight"):
        load(ModelConfig.from_dir(path))


def test_missing_model_parameter_is_an_error(tiny_models, tmp_path):
    path = copy_model(tiny_models["llama"], tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        load(ModelConfig.from_dir(path))


def test_corrupt_safetensors_file(tiny_models, tmp_path):
    path = copy_model(tiny_models["llama_sharded"], tmp_path / "m")
    victim = safetensors_files(path)[1]
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(ValueError, match=victim.name):
        list(iterate_weights(path))


def test_dir_without_safetensors(tiny_models, tmp_path):
    path = copy_model(tiny_models["llama"], tmp_path / "m", weights=False)
    with pytest.raises(ValueError, match=r"m'? has no \*\.safetensors"):
        load(ModelConfig.from_dir(path))


# ---- config.json and generation_config.json --------------------------------------------------
def test_eos_ids_from_generation_config_list(tiny_models, tmp_path):
    path = copy_model(tiny_models["llama"], tmp_path / "m", weights=False)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    edit_config(path, eos_token_id=5)
    assert load_generation_config(path)["eos_token_id"] == [2, 7]
    assert ModelConfig.from_dir(path).eos_token_ids == {2, 5, 7}
    (path / "generation_config.json").unlink()
    assert load_generation_config(path) == {}


def test_arch_specific_fields(tiny_models):
    qwen2, qwen3 = ModelConfig.from_dir(tiny_models["qwen2"]), ModelConfig.from_dir(tiny_models["qwen3"])
    assert qwen2.attention_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    assert qwen3.qk_norm and not qwen3.attention_bias
    assert qwen2.sliding_window is None
    assert ModelConfig.from_dir(tiny_models["mistral"]).sliding_window is None  # 4096 > 2048
    llama3 = ModelConfig.from_dir(tiny_models["llama3"])
    assert llama3.rope_scaling["rope_type"] == "llama3" and llama3.rope_theta == 10000.0


def base_config(**changes) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "vocab_size": 100}
    config.update(changes)
    return config


def test_old_style_rope_and_dtype_fields():
    config = ModelConfig.from_dict(base_config(
        rope_theta=500000.0, torch_dtype="bfloat16",
        rope_scaling={"type": "linear", "factor": 2.0}))
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.dtype == torch.bfloat16
    assert config.head_dim == 16 and config.num_key_value_heads == 4
    qwen = ModelConfig.from_dict(base_config(model_type="qwen2", use_sliding_window=True,
                                             sliding_window=32))
    assert qwen.sliding_window == 32


def test_unknown_rope_type(tiny_models, tmp_path):
    path = copy_model(tiny_models["llama"], tmp_path / "m", weights=False)
    edit_config(path, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ValueError, match=r"rope_parameters.*'yarn'.*default, linear, llama3"):
        ModelConfig.from_dir(path)


def test_incomplete_llama3_rope():
    with pytest.raises(ValueError, match="rope_scaling.*low_freq_factor"):
        ModelConfig.from_dict(base_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_missing_required_field():
    config = base_config()
    del config["vocab_size"]
    with pytest.raises(ValueError, match="'vocab_size'"):
        ModelConfig.from_dict(config)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ValueError, match="nowhere.*does not exist"):
        ModelConfig.from_dir(tmp_path / "nowhere")


def test_dir_without_config_json(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)


# ---- tokenizer -------------------------------------------------------------------------------
def test_tokenizer_and_chat_template(tiny_models):
    tokenizer = load_tokenizer(tiny_models["llama"])
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    ids = tokenizer("the moon is bright").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the moon is bright"


def test_chat_template_from_tokenizer_config(tiny_models, tmp_path):
    path = copy_model(tiny_models["llama"], tmp_path / "m", weights=False)
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
    assert load_tokenizer(path).chat_template == template


def test_tokenizer_less_dir(tiny_models, tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text((tiny_models["llama"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"m'? has no tokenizer files.*tokenizer\.json"):
        load_tokenizer(path)


# ---- the demo model --------------------------------------------------------------------------
def test_demo_model_is_built_once(tmp_path, monkeypatch):
    from loom.demo_model import DEMO_NAME, ensure_demo_model

    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path))
    path = ensure_demo_model()
    assert path == tmp_path / DEMO_NAME
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_NAME]  # no temp dir left behind
    assert sum(f.stat().st_size for f in path.iterdir()) < 1_000_000
    load_tokenizer(path)
    load(ModelConfig.from_dir(path))
