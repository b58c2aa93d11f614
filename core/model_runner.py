"""The model runner: turns a SchedulerOutput into flat tensors, runs the model, samples.

A step's tokens are laid out flat, decodes first, then prefill chunks. The runner keeps each
request's tokens and block table between steps; the scheduler sends only what changed.
Decode-only steps replay captured device graphs when the platform and backend allow it.
Under tensor parallelism every rank has a runner over its shard of the model and its own KV cache
(its heads) and runs the same steps; rank 0 samples and broadcasts the sampled tokens, which the
other ranks keep on the device for the next step's inputs, as rank 0 does.

With speculative decoding (a proposer set; one rank only), a request that samples brings its
drafts as extra tokens of the step; its last token and each draft get logits, the rejection
sampler keeps the accepted drafts and one more token, and the proposer guesses the next drafts
(not for requests in draft backoff). Such a step waits for its tokens on the host; one with no
drafts and nothing to propose leaves them on the device, as plain decoding does.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from loom.attention import AttentionBackend, AttentionMetadata, kv_cache_torch_dtype
from loom.config import EngineConfig
from loom.cuda_graphs import DecodeGraphs
from loom.distributed.group import SINGLE, TensorParallelGroup, building
from loom.model_config import ModelConfig
from loom.models.layers import VocabEmbedding, local_head_counts
from loom.platform import Platform
from loom.sampler import Sampler, SamplerOutput, SamplingRow, TokenSpan, argmax, to_device
from loom.sampling_params import SamplingParams
from loom.scheduler_output import ModelRunnerOutput, SchedulerOutput
from loom.spec_decode.proposer import ProposalRequest, Proposer
from loom.spec_decode.rejection import Verdict, verify_on_device

logger = logging.getLogger("loom")
GiB = 1 << 30


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
    spec_token_ids: list[int] = field(default_factory=list)   # drafts verified this step


@dataclass
class HostBatch:
    """One step's inputs as host arrays, sequences ordered decodes first."""
    req_ids: list[str]
    input_ids: np.ndarray         # [T] int64
    positions: np.ndarray         # [T] int64
    slot_mapping: np.ndarray      # [T] int64
    query_start: np.ndarray       # [S+1] int32
    seq_lens: np.ndarray          # [S] int32: cached tokens after this step
    block_table: np.ndarray       # [S, max_blocks] int32
    num_decodes: int
    logits_indices: np.ndarray    # rows of the hidden states that sample
    sampling_req_ids: list[str]
    # Input positions whose token is still on the device, sampled by the previous step:
    placeholder_index: np.ndarray  # [P] index into input_ids
    placeholder_source: np.ndarray  # [P] row of the previous step's sampled tokens
    num_drafts: np.ndarray | None = None   # per sampling request: drafts it verifies

    @property
    def num_seqs(self) -> int:
        return len(self.req_ids)

    @property
    def decode_only(self) -> bool:
        return self.num_decodes == self.num_seqs

    @property
    def all_sample_in_order(self) -> bool:
        return len(self.logits_indices) == len(self.input_ids)


class PendingOutput:
    """A step's sampled tokens on their way to the host; ``result()`` waits for them."""

    def __init__(self, req_ids: list[str], rows: list[SamplingRow],
                 sampled: SamplerOutput | None, device: torch.device):
        self.req_ids, self.rows = req_ids, rows
        self.sampled = sampled
        self.event = None
        if sampled is not None and device.type != "cpu":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    for t in sampled.tensors()]
            for h, t in zip(host, sampled.tensors()):
                h.copy_(t, non_blocking=True)
            self.sampled = sampled.with_tensors(host)
            self.event = torch.Event(device=device)
            self.event.record()

    def result(self) -> ModelRunnerOutput:
        if self.sampled is None:
            return ModelRunnerOutput()
        if self.event is not None:
            self.event.synchronize()
        tokens, logprobs = self.sampled.to_lists(self.rows)
        return ModelRunnerOutput(self.req_ids, [[t] for t in tokens], logprobs)


class ReadyOutput:
    """A step whose outputs already reached the host (steps that verify drafts or propose)."""

    def __init__(self, output: ModelRunnerOutput):
        self.output = output

    def result(self) -> ModelRunnerOutput:
        return self.output


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, platform: Platform,
                 attn_backend_cls: type[AttentionBackend], quant_method, model_cls,
                 dtype: torch.dtype, block_size: int, max_model_len: int,
                 max_num_batched_tokens: int, device_index: int = 0,
                 tp: TensorParallelGroup = SINGLE):
        from loom.loader import load_model

        self.config = config
        self.model_config = model_config
        self.platform = platform
        self.device_index = device_index
        self.device = platform.device(device_index)
        self.dtype = dtype
        self.kv_cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, dtype, platform)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.tp = tp
        mc = model_config
        self.num_heads, self.num_kv_heads = local_head_counts(
            mc.num_attention_heads, mc.num_key_value_heads, tp.size)
        self.attn = attn_backend_cls(self.num_heads, self.num_kv_heads, mc.head_dim,
                                     mc.head_dim ** -0.5, dtype, self.device)
        start = time.perf_counter()
        with building(tp):
            self.model = load_model(mc, model_cls, quant_method, self.attn, dtype, self.device,
                                    config.load_format, seed=config.seed)
        self.weight_bytes = _weight_bytes(self.model)
        self.decode_weight_bytes = self.weight_bytes - _gathered_bytes(self.model)
        logger.info("weights: %.2f GB, loaded in %.1f s", self.weight_bytes / 1e9,
                    time.perf_counter() - start)
        self.sampler = Sampler()
        self.requests: dict[str, RequestState] = {}
        self.eos_token_ids = frozenset(mc.eos_token_ids)
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.graphs: DecodeGraphs | None = None
        self.prev_sampled: torch.Tensor | None = None   # the last step's tokens, on the device
        self.prev_rows: dict[str, int] = {}              # request -> its row in prev_sampled
        # Speculative decoding: the proposer, the query length of verification steps (k + 1,
        # also set on a draft model's runner for its pass over those steps) and their graphs.
        self.proposer: Proposer | None = None
        self.proposing = True                # False: verify nothing new, propose nothing
        self.spec_query_len: int | None = None
        self.spec_graphs: DecodeGraphs | None = None
        self.draft_probs: dict[str, torch.Tensor] = {}   # request -> q of its proposals

    # ---- KV cache ------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        mc = self.model_config
        shape = self.attn.kv_cache_shape(1, self.block_size, self.num_kv_heads, mc.head_dim)
        per_layer = int(np.prod(shape)) * self.kv_cache_dtype.itemsize
        extra = self.proposer.kv_block_bytes() if self.proposer is not None else 0
        return per_layer * mc.num_hidden_layers + extra

    def determine_num_blocks(self) -> int:
        """Blocks for the KV cache: num-gpu-blocks-override, else kv-cache-memory-gb, else the
        platform's default budget (CPU), else what the profile leaves on the device."""
        config = self.config
        if config.num_gpu_blocks_override is not None:
            return config.num_gpu_blocks_override
        block_bytes = self.kv_block_bytes()
        if config.kv_cache_memory_gb is not None:
            budget = int(config.kv_cache_memory_gb * GiB)
        elif self.platform.default_kv_cache_gb is not None:
            # No reason to reserve more than every sequence slot at full length can use.
            full = config.max_num_seqs * -(-self.max_model_len // self.block_size) * block_bytes
            budget = min(int(self.platform.default_kv_cache_gb * GiB), full)
        else:
            budget = self.profile_kv_budget()
        num_blocks = max(budget // block_bytes, 0)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens, %.2f GB, %s", num_blocks,
                    self.block_size, num_blocks * self.block_size, num_blocks * block_bytes / 1e9,
                    self.kv_cache_dtype)
        return num_blocks

    def profile_kv_budget(self) -> int:
        """Bytes the KV cache may take: gpu-memory-utilization of the device, less what is in
        use now (weights, context, workspaces) and the activation peak of a maximal step."""
        p, index = self.platform, self.device_index
        p.synchronize()
        p.empty_cache()
        p.reset_peak_memory_stats(index)
        before = p.memory_allocated(index)
        self._profile_run()
        p.synchronize()
        activation_peak = p.peak_memory_allocated(index) - before
        p.empty_cache()
        free, total = p.memory_info(index)
        budget = int(total * self.config.gpu_memory_utilization) - (total - free) - activation_peak
        logger.info("memory: %.1f GB total, %.1f GB in use after loading, %.2f GB activation peak"
                    " -> %.1f GB for the KV cache (gpu-memory-utilization %.2f)", total / 1e9,
                    (total - free) / 1e9, activation_peak / 1e9, budget / 1e9,
                    self.config.gpu_memory_utilization)
        return max(budget, 0)

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """A step of max-num-batched-tokens prefill tokens over a throwaway cache, plus the
        logits and sampling of max-num-seqs rows."""
        tokens = self.max_num_batched_tokens
        num_seqs = max(1, min(self.config.max_num_seqs, tokens))
        per_seq = -(-tokens // num_seqs)
        blocks_per_seq = -(-per_seq // self.block_size)
        self._allocate_own_kv_cache(num_seqs * blocks_per_seq)
        lens = [per_seq] * (tokens // per_seq) + ([tokens % per_seq] if tokens % per_seq else [])
        hb = _dummy_prefill(lens, blocks_per_seq, self.block_size)
        input_ids, positions, metadata = self._eager_inputs(hb)
        hidden = self.model(input_ids, positions, self.kv_caches, self.attn.build_metadata(metadata))
        rows = hidden[:1].expand(num_seqs, -1)
        torch.softmax(self.model.compute_logits(rows).float(), dim=-1)
        self.kv_caches = []
        if self.proposer is not None:
            self.proposer.profile_run()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The KV cache of ``num_blocks`` blocks, and the proposer's of as many."""
        self._allocate_own_kv_cache(num_blocks)
        if self.proposer is not None:
            self.proposer.allocate_kv_cache(num_blocks)

    def _allocate_own_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        shape = self.attn.kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads,
                                         mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
                          for _ in range(mc.num_hidden_layers)]
        self.num_blocks = num_blocks

    def capture_graphs(self) -> None:
        """Capture decode graphs, when the platform and the attention backend support them."""
        if self.config.enforce_eager or not (self.platform.supports_graphs
                                             and self.attn.supports_graphs):
            return
        self.graphs = DecodeGraphs(self, self.config.cuda_graph_sizes)
        self.graphs.capture()
        if self.spec_query_len is not None and self.attn.supports_verify_graphs:
            self.spec_graphs = DecodeGraphs(self, self.config.cuda_graph_sizes,
                                            self.spec_query_len)
            self.spec_graphs.capture()
        if self.proposer is not None:
            self.proposer.capture_graphs()

    # ---- per-step state ------------------------------------------------------------------
    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_req_ids:
            self.requests.pop(rid, None)
            self.draft_probs.pop(rid, None)
            if self.proposer is not None:
                self.proposer.drop(rid)
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
            if cached.num_kept_blocks is not None:          # the scheduler freed its tail
                del state.block_ids[cached.num_kept_blocks:]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
        for rid in sched.num_scheduled_tokens:
            self.requests[rid].spec_token_ids = sched.scheduled_spec_tokens.get(rid, [])

    def _host_batch(self, sched: SchedulerOutput) -> HostBatch:
        counts = sched.num_scheduled_tokens
        # Decodes (one query token) first: backends split the batch at num_decodes.
        order = sorted(counts, key=lambda rid: counts[rid] != 1)
        states = [self.requests[rid] for rid in order]
        num_new = np.array([counts[rid] for rid in order], dtype=np.int64)
        known = np.array([len(s.token_ids) for s in states], dtype=np.int64)
        drafts = np.array([len(s.spec_token_ids) for s in states], dtype=np.int64)
        starts = np.array([s.num_computed_tokens for s in states], dtype=np.int64)
        ends = starts + num_new
        query_start = np.zeros(len(states) + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start[1:])
        total = int(query_start[-1])
        req_idx = np.repeat(np.arange(len(states)), num_new)
        positions = np.arange(total) - query_start[req_idx] + starts[req_idx]
        input_ids = np.zeros(total, dtype=np.int64)
        ph_index, ph_source = [], []
        for i, s in enumerate(states):
            real_end = min(ends[i], known[i])
            input_ids[query_start[i]:query_start[i] + real_end - starts[i]] = \
                s.token_ids[starts[i]:real_end]
            if drafts[i]:                     # the drafts follow its last token (a padding
                input_ids[query_start[i + 1] - drafts[i]:query_start[i + 1]] = np.maximum(
                    s.spec_token_ids, 0)          # slot, PAD_DRAFT, reads token 0)
            elif ends[i] > known[i]:          # its last token was sampled by the last step
                ph_index.append(query_start[i + 1] - 1)
                ph_source.append(self.prev_rows[s.req_id])
        max_blocks = max(len(s.block_ids) for s in states)
        block_table = np.zeros((len(states), max_blocks), dtype=np.int32)
        for i, s in enumerate(states):
            block_table[i, :len(s.block_ids)] = s.block_ids
        bs = self.block_size
        slots = block_table[req_idx, positions // bs].astype(np.int64) * bs + positions % bs
        sampling = np.flatnonzero(ends >= known)   # caught up: its last token samples
        # A sampling request's last 1 + drafts tokens get logits.
        num_logits = drafts[sampling] + 1
        first = np.repeat(query_start[1:][sampling] - num_logits, num_logits)
        offset = np.arange(num_logits.sum()) - np.repeat(np.cumsum(num_logits) - num_logits,
                                                         num_logits)
        return HostBatch(order, input_ids, positions, slots, query_start.astype(np.int32),
                         ends.astype(np.int32), block_table, int((num_new == 1).sum()),
                         first + offset, [order[i] for i in sampling],
                         np.array(ph_index, dtype=np.int64), np.array(ph_source, dtype=np.int64),
                         drafts[sampling])

    def _h2d(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the device without waiting for the device."""
        t = torch.from_numpy(array)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _eager_inputs(self, hb: HostBatch):
        qsl_cpu = torch.from_numpy(hb.query_start)
        lens_cpu = torch.from_numpy(hb.seq_lens)
        metadata = AttentionMetadata(
            num_seqs=hb.num_seqs, num_decodes=hb.num_decodes, num_tokens=len(hb.input_ids),
            max_query_len=int(np.diff(hb.query_start).max()), max_seq_len=int(hb.seq_lens.max()),
            query_start_loc=self._h2d(hb.query_start), seq_lens=self._h2d(hb.seq_lens),
            block_tables=self._h2d(hb.block_table), slot_mapping=self._h2d(hb.slot_mapping),
            query_start_loc_cpu=qsl_cpu, seq_lens_cpu=lens_cpu, block_size=self.block_size,
            block_tables_cpu=torch.from_numpy(hb.block_table))
        input_ids = self._h2d(hb.input_ids)
        self.fill_placeholders(input_ids, hb)
        return input_ids, self._h2d(hb.positions), metadata

    def fill_placeholders(self, input_ids: torch.Tensor, hb: HostBatch) -> None:
        """Put the previous step's sampled tokens, still on the device, into ``input_ids``."""
        if len(hb.placeholder_index):
            input_ids[self._h2d(hb.placeholder_index)] = \
                self.prev_sampled[self._h2d(hb.placeholder_source)]

    def _sampling_rows(self, hb: HostBatch) -> list[SamplingRow]:
        rows = []
        ends = dict(zip(hb.req_ids, hb.seq_lens.tolist()))
        for rid in hb.sampling_req_ids:
            s = self.requests[rid]
            num_out = ends[rid] - s.num_prompt_tokens   # outputs so far, one maybe on the device
            if s.generator is not None:
                # Randomness is a function of (seed, position): independent of the batch, and
                # a request resumed after preemption draws what it would have drawn.
                s.generator.manual_seed(hash((s.seed, num_out)) & ((1 << 63) - 1))
            rows.append(SamplingRow(
                s.sampling_params, s.generator, TokenSpan(s.token_ids, 0, s.num_prompt_tokens),
                TokenSpan(s.token_ids, s.num_prompt_tokens, len(s.token_ids)),
                self.eos_token_ids, num_out))
        return rows

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_async(sched).result()

    def forward(self, hb: HostBatch) -> torch.Tensor:
        """Hidden states of every token of the batch: a graph replay where one fits."""
        for graphs in (self.graphs, self.spec_graphs):
            if graphs is not None and graphs.can_run(hb):
                return graphs.run(hb)
        input_ids, positions, metadata = self._eager_inputs(hb)
        return self.model(input_ids, positions, self.kv_caches, self.attn.build_metadata(metadata))

    @torch.inference_mode()
    def execute_async(self, sched: SchedulerOutput) -> PendingOutput | ReadyOutput:
        """Launch a step; the host does not wait for the device (except where the platform
        itself is synchronous, like the CPU, or the step verifies drafts or proposes)."""
        self._update_states(sched)
        if sched.is_empty:
            return PendingOutput([], [], None, self.device)
        hb = self._host_batch(sched)
        hidden = self.forward(hb)
        if self.proposer is not None:
            self.proposer.observe(hb, self.prev_sampled)
        if not hb.sampling_req_ids:
            return PendingOutput([], [], None, self.device)
        if not hb.all_sample_in_order:
            hidden = hidden[self._h2d(hb.logits_indices)]
        logits = self.model.compute_logits(hidden)
        if self.proposer is not None:
            return self._speculative_step(hb, logits, sched.backoff_req_ids)
        if self.tp.rank == 0:
            rows, sampled = self._sample(logits, hb)
        else:
            rows, sampled = [], SamplerOutput(torch.empty(len(hb.sampling_req_ids),
                                                          dtype=torch.int64, device=self.device))
        self.tp.broadcast(sampled.token_ids)
        self._keep_sampled(hb.sampling_req_ids, sampled.token_ids)
        if self.tp.rank != 0:                  # only rank 0 reports tokens
            return PendingOutput([], [], None, self.device)
        return PendingOutput(hb.sampling_req_ids, rows, sampled, self.device)

    def _keep_sampled(self, req_ids: list[str], last_tokens: torch.Tensor) -> None:
        """Each request's last token of this step, on the device, for the next step's
        placeholders."""
        self.prev_sampled = last_tokens
        self.prev_rows = {rid: i for i, rid in enumerate(req_ids)}

    def _sample(self, logits: torch.Tensor, hb: HostBatch) -> tuple[list[SamplingRow],
                                                                    SamplerOutput]:
        if all(self.requests[r].sampling_params.plain_greedy for r in hb.sampling_req_ids):
            return [], SamplerOutput(argmax(logits))   # no per-row work
        rows = self._sampling_rows(hb)
        return rows, self.sampler.forward(logits, rows)

    # ---- speculative steps ---------------------------------------------------------------
    def _speculative_step(self, hb: HostBatch, logits: torch.Tensor,
                          backoff: set[str]) -> PendingOutput | ReadyOutput:
        """Verify the step's drafts and propose the next ones for the requests not in
        ``backoff``. A step with neither keeps its tokens on the device, as plain decoding does:
        the scheduler may launch the next step before they reach the host."""
        proposing = ({rid for rid in hb.sampling_req_ids if rid not in backoff}
                     if self.proposing else set())
        num_outs = self._num_outputs(hb)
        rows, seeds, drafts = self._position_rows(hb, num_outs)
        verdict = verify_on_device(logits, rows, seeds, drafts, self._draft_probs(hb, logits))
        forced = self._forced_paths(hb, num_outs, drafts)
        if not proposing and not any(drafts):
            return self._tokens_on_device(hb, verdict, rows, forced)
        verified = verdict.to_host(rows, drafts)
        for i, path in enumerate(forced or []):
            if path is not None:
                verified.token_ids[i] = path
        self._keep_sampled(hb.sampling_req_ids, to_device(
            [t[-1] for t in verified.token_ids], torch.long, self.device))
        spec = self._propose(hb, num_outs, verified.token_ids, proposing)
        return ReadyOutput(ModelRunnerOutput(list(hb.sampling_req_ids), verified.token_ids,
                                             verified.logprobs, spec))

    def _tokens_on_device(self, hb: HostBatch, verdict: Verdict, rows: list[SamplingRow] | None,
                          forced: list[list[int] | None] | None) -> PendingOutput:
        """A step without drafts: one token per request, left on the device."""
        tokens = verdict.target
        index = [i for i, path in enumerate(forced or []) if path is not None]
        if index:
            tokens[to_device(index, torch.long, self.device)] = to_device(
                [forced[i][0] for i in index], torch.long, self.device)
        self._keep_sampled(hb.sampling_req_ids, tokens)
        return PendingOutput(hb.sampling_req_ids, rows or [],
                             SamplerOutput(tokens, verdict.logprobs), self.device)

    def _propose(self, hb: HostBatch, num_outs: list[int], emitted: list[list[int]],
                 proposing: set[str]) -> list[list[int]]:
        """Proposals per sampling request: none for those not ``proposing``."""
        requests = []
        for rid, new_tokens, num_out in zip(hb.sampling_req_ids, emitted, num_outs):
            self.draft_probs.pop(rid, None)
            if rid not in proposing:
                continue
            s = self.requests[rid]
            assert num_out == len(s.token_ids) - s.num_prompt_tokens, \
                f"{rid}: proposing while its last token is still on the device"
            room = self.max_model_len - len(s.token_ids) - len(new_tokens) - 1
            requests.append(ProposalRequest(
                rid, s.token_ids, new_tokens, s.num_prompt_tokens, max(room, 0),
                s.sampling_params, s.seed, s.generator, s.block_ids))
        spec = {rid: [] for rid in hb.sampling_req_ids}
        if not requests:
            return list(spec.values())
        proposals = self.proposer.propose(requests)
        for i, req in enumerate(requests):
            spec[req.req_id] = proposals.token_ids[i]
            if proposals.probs is not None and proposals.probs[i] is not None:
                self.draft_probs[req.req_id] = proposals.probs[i]
        return list(spec.values())

    def _num_outputs(self, hb: HostBatch) -> list[int]:
        """Per sampling request, its outputs before this step's first sampled position (one
        may still be on the device, sampled by the previous step)."""
        ends = dict(zip(hb.req_ids, hb.seq_lens.tolist()))
        return [ends[rid] - int(num_drafts) - self.requests[rid].num_prompt_tokens
                for rid, num_drafts in zip(hb.sampling_req_ids, hb.num_drafts)]

    def _forced_paths(self, hb: HostBatch, num_outs: list[int], drafts: list[list[int]]
                      ) -> list[list[int] | None] | None:
        """The oracle's force-path: per sampling request what it emits instead (None: what
        verification says); None for other proposers."""
        forced = getattr(self.proposer, "forced_tokens", None)
        if forced is None:
            return None
        paths = []
        for rid, num_out, d in zip(hb.sampling_req_ids, num_outs, drafts):
            s = self.requests[rid]
            paths.append(forced(rid, TokenSpan(s.token_ids, 0, s.num_prompt_tokens), num_out, d))
        return paths

    def _position_rows(self, hb: HostBatch, num_outs: list[int]):
        """A SamplingRow and a seed per verified position, and each request's drafts; rows and
        seeds are None when every request is plain greedy. The outputs before position j count
        its first j drafts, as plain decoding would."""
        states = [self.requests[rid] for rid in hb.sampling_req_ids]
        drafts = [s.spec_token_ids for s in states]
        if all(s.sampling_params.plain_greedy for s in states):
            return None, None, drafts                           # argmax alone decides
        rows, seeds = [], []
        for s, num_out in zip(states, num_outs):
            prompt = TokenSpan(s.token_ids, 0, s.num_prompt_tokens)
            for j in range(len(s.spec_token_ids) + 1):
                outputs = TokenSpan(s.token_ids, s.num_prompt_tokens, len(s.token_ids))
                if j and s.sampling_params.needs_penalties:
                    outputs = list(outputs) + s.spec_token_ids[:j]
                rows.append(SamplingRow(s.sampling_params, s.generator, prompt, outputs,
                                        self.eos_token_ids, num_out + j))
                seeds.append(None if s.generator is None
                             else hash((s.seed, num_out + j)) & ((1 << 63) - 1))
        return rows, seeds, drafts

    def _draft_probs(self, hb: HostBatch, logits: torch.Tensor) -> torch.Tensor | None:
        """[positions, vocab]: at each draft position of a sampling request, the distribution
        its draft came from (zeros elsewhere); None when no draft came with one."""
        stored = [(i, self.draft_probs.get(rid)) for i, rid in enumerate(hb.sampling_req_ids)]
        if not any(q is not None and hb.num_drafts[i] for i, q in stored):
            return None
        out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        start = 0
        for i, q in stored:
            num = int(hb.num_drafts[i])
            if q is not None and num:
                real = min(num, len(q))                  # padding drafts have none
                out[start:start + real] = q[:real]
            start += num + 1
        return out


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights: parameters, and the buffers quantized layers keep them in (packed
    ints, scales), but not the rotary cos/sin table, of which a step reads only its rows."""
    tensors = list(model.parameters()) + [b for name, b in model.named_buffers()
                                          if not name.endswith("cos_sin_cache")]
    return sum(t.numel() * t.element_size() for t in tensors)


def _gathered_bytes(model: torch.nn.Module) -> int:
    """Bytes of embedding tables a decode step only gathers rows from (not tied to the head)."""
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if type(m) is VocabEmbedding and m.weight is not head)


def _dummy_prefill(lens: list[int], blocks_per_seq: int, block_size: int) -> HostBatch:
    """A prefill-only batch of fresh sequences of the given lengths over distinct blocks."""
    lens_arr = np.array(lens, dtype=np.int64)
    query_start = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens_arr, out=query_start[1:])
    req_idx = np.repeat(np.arange(len(lens)), lens_arr)
    positions = np.arange(int(query_start[-1])) - query_start[req_idx]
    block_table = (np.arange(len(lens) * blocks_per_seq, dtype=np.int32)
                   .reshape(len(lens), blocks_per_seq))
    slots = block_table[req_idx, positions // block_size].astype(np.int64) * block_size \
        + positions % block_size
    empty = np.zeros(0, dtype=np.int64)
    return HostBatch([str(i) for i in range(len(lens))], np.zeros_like(positions), positions,
                     slots, query_start.astype(np.int32), lens_arr.astype(np.int32), block_table,
                     0, query_start[1:] - 1, [], empty, empty)
