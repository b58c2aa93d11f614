"""The Engine: requests in, RequestOutputs out, one scheduler step at a time.

step(): scheduler.schedule() -> executor.execute() -> scheduler.update() -> output processor.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loom.config import ConfigError, EngineConfig
from loom.executor import Executor, RunnerSpec, make_executor
from loom.kv_cache import KVCacheManager
from loom.loader import load_generation_config, load_tokenizer
from loom.model_config import ModelConfig
from loom.output_processor import OutputProcessor
from loom.outputs import RequestOutput
from loom.plugin_manager import PluginManager, get_plugin_manager
from loom.request import Request, RequestStatus
from loom.sampling_params import SamplingParams
from loom.scheduler import Scheduler
from loom.spec_decode import build_proposer
from loom.spec_decode.config import SpeculativeConfig, parse_speculative
from loom.spec_decode.stats import SpecDecodeStats

logger = logging.getLogger("loom")

DEMO_MODEL = "loom-demo"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_BATCHED_TOKENS = 8192


@dataclass
class StepRecord:
    """One step, for profiling (Engine.step_records): what ran and where the time went."""
    num_tokens: int
    num_seqs: int
    seconds: float          # the whole step() call
    wait_seconds: float     # of which waiting for the device to finish a step


@dataclass
class ResolvedConfig:
    """What the engine derived from the config and the checkpoint."""
    model_path: Path
    model_config: ModelConfig
    dtype: torch.dtype
    max_model_len: int
    max_num_batched_tokens: int
    block_size: int


def resolve_model_path(model: str) -> Path:
    if model == DEMO_MODEL:
        from loom.demo_model import ensure_demo_model
        return ensure_demo_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"config key 'model': {model!r} is not a model directory "
                          f"(nor '{DEMO_MODEL}'); loom loads local Hugging Face model directories")
    return path


# Config keys whose other values later versions implement; refused rather than ignored.
NOT_YET = {"kv_cache_dtype": ("auto", "only 'auto' (the model dtype) in this version")}


def check_tensor_parallel_size(size: int, mc: ModelConfig) -> None:
    """Every rank gets the same number of query heads, of MLP columns, and KV heads split
    evenly or shared evenly (replicated when there are fewer than ranks)."""
    def fits(n: int) -> bool:
        kv = mc.num_key_value_heads
        return (mc.num_attention_heads % n == 0 and mc.intermediate_size % n == 0
                and (kv % n == 0 or n % kv == 0))

    if not fits(size):
        valid = [n for n in range(1, mc.num_attention_heads + 1) if fits(n)]
        raise ConfigError(
            f"config key 'tensor-parallel-size': {size} does not split this model evenly "
            f"({mc.num_attention_heads} attention heads, {mc.num_key_value_heads} KV heads, "
            f"MLP size {mc.intermediate_size}); use one of {', '.join(map(str, valid))}")


def resolve(config: EngineConfig, platform, attn_cls) -> ResolvedConfig:
    for key, (supported, why) in NOT_YET.items():
        if getattr(config, key) != supported:
            raise ConfigError(f"config key '{key.replace('_', '-')}': {why}, got "
                              f"{getattr(config, key)!r}")
    path = resolve_model_path(config.model)
    mc = ModelConfig.from_dir(path)
    check_tensor_parallel_size(config.tensor_parallel_size, mc)
    if config.speculative is not None and config.tensor_parallel_size > 1:
        raise ConfigError("config key 'speculative': not available with tensor-parallel-size > 1 "
                          f"in this version (got {config.tensor_parallel_size}); use one of them")
    dtype = (platform.preferred_dtype(mc.dtype) if config.dtype == "auto"
             else DTYPES[config.dtype])
    if dtype not in platform.supported_dtypes:
        raise ConfigError(f"config key 'dtype': {config.dtype} is not supported on "
                          f"{platform.name}")
    limit = mc.max_position_embeddings
    if mc.sliding_window is not None:
        limit = min(limit, mc.sliding_window)   # no sliding-window attention: stay exact
    max_model_len = config.max_model_len or limit
    if max_model_len > limit:
        raise ConfigError(f"config key 'max-model-len': {max_model_len} exceeds the model's "
                          f"limit of {limit} tokens")
    batched = config.max_num_batched_tokens
    if batched is None:
        batched = (DEFAULT_BATCHED_TOKENS if config.enable_chunked_prefill
                   else max(DEFAULT_BATCHED_TOKENS, max_model_len))
    if not config.enable_chunked_prefill and batched < max_model_len:
        raise ConfigError(f"config key 'max-num-batched-tokens': must be >= max-model-len "
                          f"({max_model_len}) when enable-chunked-prefill is false, got {batched}")
    block_size = config.block_size or attn_cls.required_block_size or 16
    if attn_cls.required_block_size and block_size != attn_cls.required_block_size:
        raise ConfigError(f"config key 'block-size': attention backend {attn_cls.name!r} requires "
                          f"{attn_cls.required_block_size}, got {block_size}")
    return ResolvedConfig(path, mc, dtype, max_model_len, batched, block_size)


class Engine:
    def __init__(self, config: EngineConfig, plugin_manager: PluginManager | None = None):
        self.config = config
        pm = plugin_manager or get_plugin_manager()
        self.platform = pm.platform(config.platform)
        attn_cls = pm.attention_backend(config.attention_backend, self.platform)
        self.resolved = r = resolve(config, self.platform, attn_cls)
        self.model_config = r.model_config
        quant = pm.quant_method(config.quantization, r.model_config.quantization_config)
        quant.check_platform(self.platform, r.dtype)
        model_cls = pm.model_class(r.model_config.architecture)
        fused = pm.fused_ops(config.fused_ops, self.platform)
        self.tokenizer = (None if config.skip_tokenizer_init
                          else load_tokenizer(config.tokenizer or r.model_path))
        self.generation_config = load_generation_config(r.model_path)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        if config.attention_backend == "auto":
            logger.info("attention backend %s: the first available of %s's defaults (%s)",
                        attn_cls.name, self.platform.name,
                        ", ".join(self.platform.default_attention_backends))
        logger.info("loom: %s on %s, attention %s, fused ops %s, quantization %s, dtype %s",
                    r.model_path, self.platform.describe(), attn_cls.name, fused.name, quant.name,
                    r.dtype)
        runner_spec = RunnerSpec(config, r.model_config, self.platform, attn_cls, quant,
                                 model_cls, fused, r.dtype, r.block_size, r.max_model_len,
                                 r.max_num_batched_tokens)
        self.executor: Executor = make_executor(runner_spec)
        self.speculative: SpeculativeConfig | None = None
        self.proposer = None
        self.async_scheduling = config.async_scheduling
        try:
            if config.speculative is not None:
                self._set_up_speculation(self.executor.runner, pm, attn_cls)
            num_blocks = self._size_kv_cache()
        except BaseException:
            self.executor.shutdown()
            raise
        self.kv_cache = KVCacheManager(num_blocks, r.block_size, config.enable_prefix_caching)
        spec = self.speculative
        self.scheduler = Scheduler(self.kv_cache, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=r.max_num_batched_tokens,
                                   max_model_len=r.max_model_len,
                                   enable_chunked_prefill=config.enable_chunked_prefill,
                                   async_scheduling=self.async_scheduling,
                                   num_spec_tokens=spec.num_speculative_tokens if spec else 0,
                                   num_lookahead_tokens=(self.proposer.num_lookahead_tokens
                                                         if spec else 0),
                                   pad_drafts=bool(spec) and self.executor.runner.spec_graphs
                                   is not None)
        self.outputs = OutputProcessor(self.tokenizer, speculative=spec is not None)
        self.eos_token_ids = frozenset(r.model_config.eos_token_ids)
        self._ids = itertools.count()
        self._in_flight = None               # (SchedulerOutput, pending result) of the last step
        self.step_records: list[StepRecord] | None = None   # a list: step() appends to it
        self._wait = 0.0

    def _size_kv_cache(self) -> int:
        r = self.resolved
        num_blocks = self.executor.determine_num_blocks()
        if num_blocks * r.block_size < r.max_model_len:
            raise ConfigError(
                f"the KV cache holds {num_blocks * r.block_size} tokens ({num_blocks} blocks), "
                f"fewer than max-model-len ({r.max_model_len}); lower max-model-len or give the "
                "KV cache more memory (kv-cache-memory-gb / gpu-memory-utilization)")
        return num_blocks

    @property
    def max_model_len(self) -> int:
        return self.resolved.max_model_len

    @property
    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Running totals of speculative decoding (None when it is off)."""
        return self.scheduler.spec_stats

    def _set_up_speculation(self, runner: ModelRunner, pm: PluginManager, attn_cls) -> None:
        spec = self.speculative = parse_speculative(self.config.speculative)
        self.proposer = build_proposer(spec, self, pm, attn_cls)
        runner.proposer = self.proposer
        runner.spec_query_len = spec.num_speculative_tokens + 1
        if self.async_scheduling:
            logger.info("speculative decoding (%s, k=%d): async scheduling is off, each step "
                        "proposes from the tokens the previous one accepted", spec.method,
                        spec.num_speculative_tokens)
            self.async_scheduling = False

    # ---- requests ------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt: text needs a tokenizer, but skip-tokenizer-init is set; "
                             "pass token ids")
        return self.tokenizer.encode(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue one request (``n`` sequences). Bad input raises ValueError and
        leaves the running requests untouched."""
        params = params or SamplingParams()
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer, but skip-tokenizer-init is "
                             "set; use stop_token_ids")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.outputs.groups:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, (self.tokenize(prompt) if prompt else [])
        else:
            text, token_ids = None, list(prompt)
            vocab = self.model_config.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
                raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")
        if not token_ids:
            raise ValueError("prompt: must not be empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens, but max-model-len is "
                             f"{self.max_model_len} (prompt plus at least one generated token)")
        max_tokens = self.max_model_len - len(token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        children = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            children.append(Request(f"{request_id}-{i}" if params.n > 1 else request_id,
                                    token_ids, params, self.eos_token_ids, max_tokens=max_tokens,
                                    seed=seed))
        taken = [c.request_id for c in children if c.request_id in self.scheduler.requests]
        if taken:
            raise ValueError(f"request_id: {taken[0]!r} is already in use")
        for child in children:
            self.scheduler.add_request(child)
        self.outputs.add(request_id, text, token_ids, params, children)
        return request_id

    def abort_request(self, request_ids) -> list[RequestOutput]:
        child_ids = []
        for rid in request_ids:
            group = self.outputs.groups.get(rid)
            if group is not None:
                child_ids += [s.request.request_id for s in group.sequences]
        self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        return self.outputs.finish_aborted(child_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or self._in_flight is not None

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step. With async scheduling, the previous step's tokens are
        then processed while this one runs on the device; otherwise this step's are."""
        start = time.perf_counter()
        self._wait = 0.0
        outputs = []
        if self._in_flight is not None and self.scheduler.needs_host_tokens():
            outputs += self._complete(self._in_flight)
            self._in_flight = None
        sched = self.scheduler.schedule()
        pending = self.executor.execute_async(sched)    # an empty step still drops finished ids
        launched = None if sched.is_empty else (sched, pending)
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            outputs += self._complete(previous)
        if launched is not None and not self.async_scheduling:
            outputs += self._complete(launched)
            self._in_flight = None
        if self.step_records is not None:
            self.step_records.append(StepRecord(sched.total_num_scheduled_tokens,
                                                len(sched.num_scheduled_tokens),
                                                time.perf_counter() - start, self._wait))
        return outputs

    def _complete(self, step) -> list[RequestOutput]:
        sched, pending = step
        start = time.perf_counter()
        result = pending.result()
        self._wait += time.perf_counter() - start
        updates = self.scheduler.update(sched, result)
        outputs, stopped = self.outputs.process(updates)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs

    def shutdown(self) -> None:
        self.executor.shutdown()
