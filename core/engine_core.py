"""EngineCore: the scheduler, the KV cache and the executor. Token ids in, token ids out.

It knows no tokenizer and no text: Engine (in-process) and the server's front end turn its
SequenceUpdates into RequestOutputs. What it takes and gives is plain data, so it can run in a
process of its own (loom.core_process). Tensor parallelism and speculative decoding live here:
its executor drives ranks 1..N-1 from this process (rank 0), its runner holds the proposer, and
each SequenceUpdate carries the sequence's draft and accepted token counts.

step(): scheduler.schedule() -> executor.execute() -> scheduler.update() -> SequenceUpdates.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loom.config import ConfigError, EngineConfig
from loom.executor import Executor, RunnerSpec, make_executor
from loom.kv_cache import KVCacheManager
from loom.model_config import ModelConfig
from loom.model_runner import ModelRunner
from loom.plugin_manager import PluginManager, get_plugin_manager
from loom.request import Request, RequestStatus
from loom.sampling_params import SamplingParams
from loom.scheduler import RequestUpdate, Scheduler, SchedulerStats
from loom.scheduler_output import TokenLogprobs
from loom.spec_decode import build_proposer
from loom.spec_decode.config import SpeculativeConfig, parse_speculative
from loom.spec_decode.stats import SpecDecodeStats

logger = logging.getLogger("loom")

DEMO_MODEL = "loom-demo"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_BATCHED_TOKENS = 8192


@dataclass
class StepRecord:
    """One step, for profiling (EngineCore.step_records): what ran and where the time went."""
    num_tokens: int
    num_seqs: int
    seconds: float          # the whole step() call
    wait_seconds: float     # of which waiting for the device to finish a step
    ahead: bool = False     # launched before the previous step's tokens were processed


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


def check_kv_cache_dtype(kv_cache_dtype: str, platform, attn_cls) -> None:
    """An fp8 KV cache needs a platform with an fp8 type and a backend that reads it."""
    if kv_cache_dtype == "auto":
        return
    if platform.fp8_dtype is None:
        raise ConfigError(f"config key 'kv-cache-dtype': {kv_cache_dtype} needs fp8, which "
                          f"{platform.describe()} does not have; use auto")
    if kv_cache_dtype not in attn_cls.supported_kv_cache_dtypes:
        raise ConfigError(
            f"config key 'kv-cache-dtype': attention backend {attn_cls.name!r} supports "
            f"{', '.join(attn_cls.supported_kv_cache_dtypes)}, not {kv_cache_dtype}; choose "
            "another value, or an attention-backend that supports it (triton, torch)")


def resolve(config: EngineConfig, platform, attn_cls) -> ResolvedConfig:
    check_kv_cache_dtype(config.kv_cache_dtype, platform, attn_cls)
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


@dataclass
class CoreRequest:
    """One request for the core: the prompt's token ids and n sequences to generate."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class SequenceUpdate:
    """What one step did to one sequence: the tokens it appended and whether it finished."""
    seq_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int
    num_draft_tokens: int = 0       # speculative decoding: drafts verified for it so far
    num_accepted_tokens: int = 0    # of which accepted

    def __reduce__(self):
        # Pickled as its field values (in field order: __init__ sets them so), which load
        # about 3x faster than the default object state: a step sends one per sequence.
        return SequenceUpdate, tuple(self.__dict__.values())


@dataclass
class CoreInfo:
    """What the front end needs to know about the core: for checks and /v1/models."""
    model_path: str
    max_model_len: int
    vocab_size: int
    platform: str               # the platform described
    num_blocks: int
    speculative: bool = False   # speculative decoding is on (the server counts its stats)


@dataclass
class CoreStats:
    """A snapshot of what the core holds, for tests and debugging."""
    num_requests: int           # sequences not finished
    num_blocks: int
    num_free_blocks: int
    scheduler: SchedulerStats


def sequence_ids(request_id: str, n: int) -> list[str]:
    """The ids of a request's n sequences."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


def check_prompt(token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """ValueError naming the prompt unless it is a non-empty list of token ids that leaves
    room for one generated token."""
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in token_ids):
        raise ValueError(f"prompt: token ids must be integers in [0, {vocab_size})")
    if not token_ids:
        raise ValueError("prompt: must not be empty")
    if len(token_ids) >= max_model_len:
        raise ValueError(f"prompt: {len(token_ids)} tokens, but max-model-len is "
                         f"{max_model_len} (prompt plus at least one generated token)")


class EngineCore:
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
        self.eos_token_ids = frozenset(r.model_config.eos_token_ids)
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

    def _set_up_speculation(self, runner: ModelRunner, pm: PluginManager, attn_cls) -> None:
        spec = self.speculative = parse_speculative(self.config.speculative)
        self.proposer = build_proposer(spec, self, pm, attn_cls)
        runner.proposer = self.proposer
        runner.spec_query_len = spec.num_speculative_tokens + 1
        if self.async_scheduling:
            logger.info("speculative decoding (%s, k=%d) with async scheduling: a step is "
                        "launched before the previous one's tokens are known only when no "
                        "request in it verifies drafts or proposes (all in draft backoff); "
                        "otherwise steps are synchronous", spec.method,
                        spec.num_speculative_tokens)

    @property
    def max_model_len(self) -> int:
        return self.resolved.max_model_len

    @property
    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Running totals of speculative decoding (None when it is off)."""
        return self.scheduler.spec_stats

    def info(self) -> CoreInfo:
        return CoreInfo(str(self.resolved.model_path), self.max_model_len,
                        self.model_config.vocab_size, self.platform.describe(),
                        self.kv_cache.num_blocks, self.speculative is not None)

    def stats(self) -> CoreStats:
        return CoreStats(len(self.scheduler.requests), self.kv_cache.num_blocks,
                         self.kv_cache.num_free_blocks, self.scheduler.stats())

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request: CoreRequest) -> list[str]:
        """Queue the request's sequences; their ids. Bad input raises ValueError and leaves
        the running requests untouched."""
        params = request.params
        check_prompt(request.prompt_token_ids, self.model_config.vocab_size, self.max_model_len)
        max_tokens = self.max_model_len - len(request.prompt_token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        ids = sequence_ids(request.request_id, params.n)
        taken = [i for i in ids if i in self.scheduler.requests]
        if taken:
            raise ValueError(f"request_id: {taken[0]!r} is already in use")
        for i, seq_id in enumerate(ids):
            seed = None if params.seed is None else params.seed + i
            self.scheduler.add_request(Request(seq_id, request.prompt_token_ids, params,
                                               self.eos_token_ids, max_tokens=max_tokens,
                                               seed=seed))
        return ids

    def finish_requests(self, seq_ids: list[str], status: RequestStatus) -> None:
        """End sequences from outside a step (abort, a stop string): their blocks are freed."""
        self.scheduler.finish_requests(seq_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or self._in_flight is not None

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[SequenceUpdate]:
        """Schedule and launch a step. With async scheduling, the previous step's tokens are
        then processed while this one runs on the device; otherwise this step's are."""
        start = time.perf_counter()
        self._wait = 0.0
        updates = []
        if self._in_flight is not None and self.scheduler.needs_host_tokens():
            updates += self._complete(self._in_flight)
            self._in_flight = None
        ahead = self._in_flight is not None
        sched = self.scheduler.schedule()
        pending = self.executor.execute_async(sched)    # an empty step still drops finished ids
        launched = None if sched.is_empty else (sched, pending)
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            updates += self._complete(previous)
        if launched is not None and not self.async_scheduling:
            updates += self._complete(launched)
            self._in_flight = None
        if self.step_records is not None:
            self.step_records.append(StepRecord(sched.total_num_scheduled_tokens,
                                                len(sched.num_scheduled_tokens),
                                                time.perf_counter() - start, self._wait,
                                                ahead and not sched.is_empty))
        return updates

    def _complete(self, step) -> list[SequenceUpdate]:
        sched, pending = step
        start = time.perf_counter()
        result = pending.result()
        self._wait += time.perf_counter() - start
        return [plain(u) for u in self.scheduler.update(sched, result)]

    def shutdown(self) -> None:
        self.executor.shutdown()


def plain(update: RequestUpdate) -> SequenceUpdate:
    req = update.request
    return SequenceUpdate(req.request_id, update.new_token_ids, update.logprobs,
                          req.finish_reason, req.stop_reason, req.num_cached_tokens,
                          req.num_draft_tokens, req.num_accepted_tokens)
