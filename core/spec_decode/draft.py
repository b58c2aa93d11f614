"""Draft-model proposer: a smaller model with the target's vocabulary guesses k tokens in k
autoregressive steps, batched over every request that sampled.

The draft has its own ModelRunner (weights, dtype, quantization, KV cache) and reuses the
target's block tables: its cache has as many blocks as the target's, and block b holds the
draft's K/V of the very tokens whose target K/V block b holds. It runs over every step's batch
right after the target (``observe``), so its cache is always as complete as the target's:
chunked prefill, prefix-cache hits, rejected tokens rolled back and preemption all carry over
with no bookkeeping of its own. Its k proposal steps write K/V past the verified tokens, into
the lookahead slots the scheduler reserves; the next step's verification rewrites them. The
runner asks for no proposals for requests in draft backoff: a step where all are runs the
draft's pass over the batch and nothing more.
"""
from __future__ import annotations

import numpy as np
import torch

from loom.model_runner import HostBatch, ModelRunner
from loom.sampler import SamplingRow, exponential_race, processed_probs, to_device
from loom.spec_decode.proposer import ProposalRequest, Proposals, Proposer

SEED_TAG = 0x5D5D   # draft draws use seeds apart from the target's at the same output index


class DraftModelProposer(Proposer):
    method = "draft"

    def __init__(self, num_speculative_tokens: int, runner: ModelRunner):
        super().__init__(num_speculative_tokens)
        self.runner = runner
        self.num_lookahead_tokens = num_speculative_tokens

    # ---- the draft's KV cache, next to the target's -------------------------------------
    def kv_block_bytes(self) -> int:
        return self.runner.kv_block_bytes()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def capture_graphs(self) -> None:
        self.runner.capture_graphs()

    def profile_run(self) -> None:
        self.runner._profile_run()

    @torch.inference_mode()
    def observe(self, batch: HostBatch, prev_sampled: torch.Tensor | None) -> None:
        self.runner.prev_sampled = prev_sampled     # the target's, for the batch's placeholders
        self.runner.forward(batch)

    # ---- proposals -----------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, requests: list[ProposalRequest]) -> Proposals:
        wanted = [min(self.k, r.max_proposals) for r in requests]
        steps = max(wanted, default=0)
        if steps == 0:
            return Proposals([[] for _ in requests])
        device = self.runner.device
        tokens = torch.full((len(requests), steps), -1, dtype=torch.long, device=device)
        sampled = [i for i, r in enumerate(requests) if not r.params.greedy and wanted[i]]
        slot_of = {i: s for s, i in enumerate(sampled)}
        probs = (torch.zeros(len(sampled), steps, self.runner.model_config.vocab_size,
                             device=device) if sampled else None)
        previous: dict[int, int] = {}       # request -> its row in the previous step's tokens
        for step in range(steps):
            live = [i for i in range(len(requests)) if wanted[i] > step]
            batch = self._step_batch(requests, live, step, previous)
            logits = self.runner.model.compute_logits(self.runner.forward(batch))
            drawn = self._draw(logits, [requests[i] for i in live], live, step, slot_of, probs)
            tokens[to_device(live, torch.long, device), step] = drawn
            self.runner.prev_sampled = drawn
            previous = {i: row for row, i in enumerate(live)}
        host = tokens.tolist()
        out = Proposals([host[i][:wanted[i]] for i in range(len(requests))])
        if sampled:
            out.probs = [probs[slot_of[i], :wanted[i]] if i in slot_of else None
                         for i in range(len(requests))]
        return out

    def _step_batch(self, requests, live: list[int], step: int, previous: dict) -> HostBatch:
        """Decode batch of proposal step ``step``: each live request's last token (step 0,
        known here) or its previous proposal (still on the device), one position further."""
        bs = self.runner.block_size
        positions = np.array([requests[i].num_tokens - 1 + step for i in live], dtype=np.int64)
        width = max(len(requests[i].block_ids) for i in live)
        table = np.zeros((len(live), width), dtype=np.int32)
        for row, i in enumerate(live):
            table[row, :len(requests[i].block_ids)] = requests[i].block_ids
        blocks = table[np.arange(len(live)), positions // bs].astype(np.int64)
        slots = blocks * bs + positions % bs
        n = len(live)
        if step == 0:
            input_ids = np.array([requests[i].new_token_ids[-1] for i in live], dtype=np.int64)
            ph_index = ph_source = np.zeros(0, dtype=np.int64)
        else:
            input_ids = np.zeros(n, dtype=np.int64)
            ph_index = np.arange(n, dtype=np.int64)
            ph_source = np.array([previous[i] for i in live], dtype=np.int64)
        req_ids = [requests[i].req_id for i in live]
        return HostBatch(req_ids, input_ids, positions, slots,
                         np.arange(n + 1, dtype=np.int32), (positions + 1).astype(np.int32),
                         table, n, np.arange(n), req_ids, ph_index, ph_source)

    def _draw(self, logits: torch.Tensor, reqs: list[ProposalRequest], live: list[int],
              step: int, slot_of: dict, probs: torch.Tensor | None) -> torch.Tensor:
        """Greedy requests take the draft's argmax; the others draw from the draft's
        distribution under their own sampling parameters, kept in ``probs`` for verification."""
        drawn = logits.argmax(dim=-1)
        rows = [row for row, r in enumerate(reqs) if not r.params.greedy]
        if not rows:
            return drawn
        index = to_device(rows, torch.long, logits.device)
        picked = [reqs[row] for row in rows]
        sampling_rows = [SamplingRow(r.params, r.generator, (), (), frozenset()) for r in picked]
        q = processed_probs(logits[index].float(), sampling_rows)
        q /= q.sum(dim=-1, keepdim=True)
        for r in picked:
            if r.generator is not None:
                seed = hash((r.seed, r.num_output_tokens + step, SEED_TAG)) & ((1 << 63) - 1)
                r.generator.manual_seed(seed)
        drawn[index] = exponential_race(q, [r.generator for r in picked])
        slots = to_device([slot_of[live[row]] for row in rows], torch.long, logits.device)
        probs[slots, step] = q
        return drawn


def load_draft_runner(spec, engine, pm, attn_cls) -> ModelRunner:
    """The draft model's runner: same platform, attention backend, block size and limits as
    the target; its own weights, dtype and quantization. Refuses a draft whose vocabulary
    differs from the target's."""
    from loom.config import ConfigError
    from loom.engine_core import DTYPES, resolve_model_path
    from loom.loader import TOKENIZER_FILES, load_tokenizer
    from loom.model_config import ModelConfig

    try:
        path = resolve_model_path(spec.model)
        mc = ModelConfig.from_dir(path)
    except ValueError as e:
        raise ConfigError(f"config key 'speculative.model': {e}") from None
    target, r = engine.model_config, engine.resolved
    if mc.vocab_size != target.vocab_size:
        raise ConfigError(
            f"config key 'speculative.model': the draft's vocabulary has {mc.vocab_size} tokens, "
            f"the target's {target.vocab_size}; a draft model must share the target's tokenizer")
    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    if has_tokenizer and not engine.config.skip_tokenizer_init:
        # The core has no tokenizer of its own: the target's is loaded for this check only.
        target_tokenizer = load_tokenizer(engine.config.tokenizer or r.model_path)
        if load_tokenizer(path).get_vocab() != target_tokenizer.get_vocab():
            raise ConfigError(f"config key 'speculative.model': the tokenizer in {str(path)!r} "
                              "differs from the target's; a draft model must share it")
    if mc.max_position_embeddings < r.max_model_len:
        raise ConfigError(
            f"config key 'speculative.model': the draft handles {mc.max_position_embeddings} "
            f"positions, fewer than max-model-len ({r.max_model_len})")
    dtype = r.dtype if spec.dtype == "auto" else DTYPES[spec.dtype]
    if dtype not in engine.platform.supported_dtypes:
        raise ConfigError(f"config key 'speculative.dtype': {spec.dtype} is not supported on "
                          f"{engine.platform.name}")
    quant = pm.quant_method(spec.quantization, mc.quantization_config)
    quant.check_platform(engine.platform, dtype)
    config = engine.config.replace(model=str(path), speculative=None,
                                   load_format=spec.load_format or engine.config.load_format)
    runner = ModelRunner(config, mc, engine.platform, attn_cls, quant,
                         pm.model_class(mc.architecture), dtype, r.block_size, r.max_model_len,
                         r.max_num_batched_tokens)
    runner.spec_query_len = spec.num_speculative_tokens + 1
    return runner
