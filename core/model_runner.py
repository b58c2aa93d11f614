"""The model runner: turns a SchedulerOutput into flat tensors, runs the model, samples.

A step's tokens are laid out flat, decodes first, then prefill chunks. The runner keeps each
request's tokens and block table between steps; the scheduler sends only what changed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from loom.attention import AttentionBackend, AttentionMetadata
from loom.config import EngineConfig
from loom.model_config import ModelConfig
from loom.platform import Platform
from loom.sampler import Sampler, SamplingRow
from loom.sampling_params import SamplingParams
from loom.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("loom")


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    sampling_params: SamplingParams
    seed: int | None
    generator: torch.Generator | None = None
    num_computed_tokens: int = 0         # tokens in the KV cache when this step starts


@dataclass
class StepInputs:
    req_ids: list[str]
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    sampling_req_ids: list[str]


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, platform: Platform,
                 attn_backend_cls: type[AttentionBackend], quant_method, model_cls,
                 dtype: torch.dtype, block_size: int, max_model_len: int, device_index: int = 0):
        from loom.loader import load_model

        self.config = config
        self.model_config = model_config
        self.platform = platform
        self.device = platform.device(device_index)
        self.dtype = dtype
        self.block_size = block_size
        self.max_model_len = max_model_len
        mc = model_config
        self.attn = attn_backend_cls(mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim,
                                     mc.head_dim ** -0.5, dtype, self.device)
        start = time.perf_counter()
        self.model = load_model(mc, model_cls, quant_method, self.attn, dtype, self.device,
                                config.load_format, seed=config.seed)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        logger.info("loaded weights: %.3f GB in %.1f s", self.weight_bytes / 1e9,
                    time.perf_counter() - start)
        self.sampler = Sampler()
        self.requests: dict[str, RequestState] = {}
        self.eos_token_ids = frozenset(mc.eos_token_ids)
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0

    # ---- KV cache ------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        mc = self.model_config
        shape = self.attn.kv_cache_shape(1, self.block_size, mc.num_key_value_heads, mc.head_dim)
        per_layer = int(np.prod(shape)) * torch.empty((), dtype=self.dtype).element_size()
        return per_layer * mc.num_hidden_layers

    def determine_num_blocks(self) -> int:
        """Blocks for the KV cache: num-gpu-blocks-override, else kv-cache-memory-gb, else the
        platform's default budget (CPU), else what the profile leaves on the device."""
        config = self.config
        if config.num_gpu_blocks_override is not None:
            return config.num_gpu_blocks_override
        block_bytes = self.kv_block_bytes()
        if config.kv_cache_memory_gb is not None:
            budget = int(config.kv_cache_memory_gb * (1 << 30))
        elif self.platform.default_kv_cache_gb is not None:
            # No reason to reserve more than every sequence slot at full length can use.
            full = config.max_num_seqs * -(-self.max_model_len // self.block_size) * block_bytes
            budget = min(int(self.platform.default_kv_cache_gb * (1 << 30)), full)
        else:
            budget = self.profile_kv_budget()
        num_blocks = budget // block_bytes
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GB)", num_blocks,
                    self.block_size, num_blocks * self.block_size, num_blocks * block_bytes / 1e9)
        return num_blocks

    def profile_kv_budget(self) -> int:
        """Device memory the KV cache may take: the utilization share of the device, less the
        weights and the peak of one maximal step."""
        raise NotImplementedError(
            f"KV-cache sizing by profiling is not implemented on {self.platform.name}; "
            "set kv-cache-memory-gb or num-gpu-blocks-override")

    def allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        shape = self.attn.kv_cache_shape(num_blocks, self.block_size, mc.num_key_value_heads,
                                         mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(mc.num_hidden_layers)]
        self.num_blocks = num_blocks

    # ---- per-step state ------------------------------------------------------------------
    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_req_ids:
            self.requests.pop(rid, None)
        for new in sched.new_requests:
            gen = None
            if new.seed is not None:
                gen = torch.Generator(device=self.device)
            self.requests[new.req_id] = RequestState(
                new.req_id, new.prompt_token_ids + new.output_token_ids,
                len(new.prompt_token_ids), list(new.block_ids), new.sampling_params, new.seed, gen,
                new.num_computed_tokens)
        for cached in sched.cached_requests:
            state = self.requests[cached.req_id]
            state.token_ids.extend(cached.new_token_ids)
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _prepare(self, sched: SchedulerOutput) -> StepInputs:
        counts = sched.num_scheduled_tokens
        # Decodes (one query token) first: backends split the batch at num_decodes.
        order = sorted(counts, key=lambda rid: counts[rid] != 1)
        states = [self.requests[rid] for rid in order]
        num_new = np.array([counts[rid] for rid in order], dtype=np.int64)
        seq_lens = np.array([len(s.token_ids) for s in states], dtype=np.int64)
        starts = np.array([s.num_computed_tokens for s in states], dtype=np.int64)
        ends = starts + num_new
        query_start = np.zeros(len(states) + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start[1:])
        total = int(query_start[-1])
        req_idx = np.repeat(np.arange(len(states)), num_new)
        positions = np.arange(total) - query_start[req_idx] + starts[req_idx]
        input_ids = np.empty(total, dtype=np.int64)
        for i, s in enumerate(states):
            input_ids[query_start[i]:query_start[i + 1]] = s.token_ids[starts[i]:ends[i]]
        max_blocks = max(len(s.block_ids) for s in states)
        block_table = np.zeros((len(states), max_blocks), dtype=np.int32)
        for i, s in enumerate(states):
            block_table[i, :len(s.block_ids)] = s.block_ids
        bs = self.block_size
        slots = block_table[req_idx, positions // bs].astype(np.int64) * bs + positions % bs
        sampling = ends == seq_lens          # caught up: this step's last token samples
        logits_idx = query_start[1:][sampling] - 1
        num_decodes = int((num_new == 1).sum())
        dev = self.device
        qsl_cpu = torch.from_numpy(query_start.astype(np.int32))
        lens_cpu = torch.from_numpy(ends.astype(np.int32))
        metadata = AttentionMetadata(
            num_seqs=len(states), num_decodes=num_decodes, num_tokens=total,
            max_query_len=int(num_new.max()), max_seq_len=int(ends.max()),
            query_start_loc=qsl_cpu.to(dev), seq_lens=lens_cpu.to(dev),
            block_tables=torch.from_numpy(block_table).to(dev),
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc_cpu=qsl_cpu, seq_lens_cpu=lens_cpu, block_size=bs)
        return StepInputs(
            req_ids=order,
            input_ids=torch.from_numpy(input_ids).to(dev),
            positions=torch.from_numpy(positions).to(dev),
            metadata=metadata,
            logits_indices=torch.from_numpy(logits_idx).to(dev),
            sampling_req_ids=[order[i] for i in np.flatnonzero(sampling)])

    def _sampling_rows(self, req_ids: list[str]) -> list[SamplingRow]:
        rows = []
        for rid in req_ids:
            s = self.requests[rid]
            outputs = s.token_ids[s.num_prompt_tokens:]
            if s.generator is not None:
                # Randomness is a function of (seed, position): independent of the batch, and
                # a request resumed after preemption draws what it would have drawn.
                s.generator.manual_seed(hash((s.seed, len(outputs))) & ((1 << 63) - 1))
            rows.append(SamplingRow(s.sampling_params, s.generator,
                                    s.token_ids[:s.num_prompt_tokens], outputs,
                                    self.eos_token_ids))
        return rows

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            return ModelRunnerOutput()
        inputs = self._prepare(sched)
        metadata = self.attn.build_metadata(inputs.metadata)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, metadata)
        if not inputs.sampling_req_ids:
            return ModelRunnerOutput()
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        tokens, logprobs = self.sampler(logits, self._sampling_rows(inputs.sampling_req_ids))
        return ModelRunnerOutput(inputs.sampling_req_ids, [[t] for t in tokens], logprobs)

