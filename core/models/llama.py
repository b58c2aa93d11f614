"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) on a flat token batch.

Forward contract (every model class follows it): ``forward(input_ids [T], positions [T],
kv_caches, attn_metadata) -> hidden [T, hidden_size]`` over the concatenated tokens of many
sequences, ``compute_logits(hidden [n, hidden_size]) -> [n, vocab]`` and
``load_weights(iterable of (hf_name, tensor)) -> set of loaded parameter names``, where a tensor
may be a lazy safetensors slice (see loom.checkpoint). Built under a tensor-parallel group, the
model holds this rank's heads and slices (see loom.models.layers); the contract is the same.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loom import checkpoint
from loom.distributed.group import current_group
from loom.model_config import ModelConfig
from loom.models.layers import (ColumnParallelLinear, Linear, LMHead, QKVParallelLinear, RMSNorm,
                                RotaryEmbedding, RowParallelLinear, SiluAndMul, VocabEmbedding,
                                local_head_counts)
from loom.quant import QuantMethod

# (fused module, checkpoint module, shard id)
STACKED_PARAMS = (
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, quant_method: QuantMethod, attn_backend,
                 rotary_emb: RotaryEmbedding, prefix: str):
        super().__init__()
        self.num_heads, self.num_kv_heads = local_head_counts(
            config.num_attention_heads, config.num_key_value_heads, current_group().size)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            self.head_dim, config.attention_bias, quant_method.for_layer(f"{prefix}.qkv_proj"),
            f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, config.o_proj_bias,
            quant_method.for_layer(f"{prefix}.o_proj"), f"{prefix}.o_proj")
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn = attn_backend

    def forward(self, positions: torch.Tensor, hidden, kv_cache: torch.Tensor,
                attn_metadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn.forward_rotary(positions, self.rotary_emb, q, k, v, kv_cache,
                                       attn_metadata)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, quant_method: QuantMethod, prefix: str):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [size, size], config.mlp_bias,
            quant_method.for_layer(f"{prefix}.gate_up_proj"), f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(size, config.hidden_size, config.mlp_bias,
                                           quant_method.for_layer(f"{prefix}.down_proj"),
                                           f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x) -> torch.Tensor:
        if self.gate_up_proj.fuses_output("silu_and_mul", x):    # gate|up and SiLU, one kernel
            return self.down_proj(self.gate_up_proj.forward_fused_output(x, "silu_and_mul"))
        return self.down_proj(self.act_fn.before(self.down_proj, self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, quant_method: QuantMethod, attn_backend,
                 rotary_emb: RotaryEmbedding, prefix: str):
        super().__init__()
        self.self_attn = LlamaAttention(config, quant_method, attn_backend, rotary_emb,
                                        f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, quant_method, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, attn_metadata):
        # Each norm feeds its linear as that linear asks: applied by its kernel (an int4 GEMV),
        # quantized per token (FP8), or plain.
        hidden, residual = self.input_layernorm.before(self.self_attn.qkv_proj, hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm.before(self.mlp.gate_up_proj, hidden,
                                                                residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, quant_method: QuantMethod, attn_backend):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                     config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, quant_method, attn_backend, rotary_emb, f"model.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                     "Qwen3ForCausalLM")

    def __init__(self, model_config: ModelConfig, quant_method: QuantMethod, attn_backend):
        super().__init__()
        self.config = model_config
        self.model = LlamaModel(model_config, quant_method, attn_backend)
        self.lm_head = LMHead(model_config.vocab_size, model_config.hidden_size)
        if model_config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> set[str]:
        """Load HF-named tensors (or lazy slices: each layer reads its part); returns the names
        of the parameters fully loaded.

        A checkpoint tensor that belongs to no parameter is a ValueError naming it.
        """
        loaded: set[str] = set()
        shards: dict[str, set[int]] = {}
        unexpected: list[str] = []
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq") or (
                    self.config.tie_word_embeddings and name == "lm_head.weight"):
                continue
            module_name, _, param_name = name.rpartition(".")
            module_name, shard_id = _fused_name(module_name)
            module = _submodule(self, module_name)
            target = f"{module_name}.{param_name}"
            if isinstance(module, Linear):
                if (param_name not in module.quant_method.checkpoint_names()
                        or getattr(module, param_name, None) is None):
                    unexpected.append(name)
                    continue
                module.load(param_name, tensor, shard_id)
                if shard_id is not None:
                    shards.setdefault(target, set()).add(shard_id)
                    if len(shards[target]) < len(module.output_sizes):
                        continue
                loaded.add(target)
            elif isinstance(module, VocabEmbedding) and param_name == "weight":
                try:
                    module.load(tensor)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                loaded.add(target)
            elif isinstance(getattr(module, param_name, None), nn.Parameter):
                _copy(getattr(module, param_name), checkpoint.read(tensor), name)
                loaded.add(target)
            else:
                unexpected.append(name)
        if unexpected:
            raise ValueError(f"{len(unexpected)} checkpoint tensors do not belong to "
                             f"{self.config.architecture}: {', '.join(unexpected[:10])}")
        return loaded


def _fused_name(module_name: str) -> tuple[str, int | None]:
    """q_proj -> (qkv_proj, 0) and the like; other modules are their own."""
    prefix, _, last = module_name.rpartition(".")
    for fused, part, shard_id in STACKED_PARAMS:
        if last == part:
            return f"{prefix}.{fused}", shard_id
    return module_name, None


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _copy(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not match the "
                         f"model's {tuple(param.shape)}")
    param.data.copy_(tensor)
