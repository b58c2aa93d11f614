"""The Engine: prompts in, RequestOutputs out, one step at a time, all in this process.

It wraps an EngineCore (scheduler, KV cache, executor: token ids only) with the tokenizer and
the output processor (detokenization, stop strings, the n sequences of a request gathered).
step(): core.step() -> output processor -> sequences a stop string ended are finished.
"""
from __future__ import annotations

import itertools

from loom.config import EngineConfig
from loom.engine_core import EngineCore
from loom.input_processor import prepare_request
from loom.loader import load_generation_config, load_tokenizer
from loom.output_processor import OutputProcessor
from loom.outputs import RequestOutput
from loom.plugin_manager import PluginManager
from loom.request import RequestStatus
from loom.sampling_params import SamplingParams
from loom.spec_decode.config import SpeculativeConfig
from loom.spec_decode.stats import SpecDecodeStats


class Engine:
    def __init__(self, config: EngineConfig, plugin_manager: PluginManager | None = None):
        self.config = config
        self.core = core = EngineCore(config, plugin_manager)
        # The core's parts, for benchmarks and tests.
        self.platform, self.resolved, self.model_config = (core.platform, core.resolved,
                                                           core.model_config)
        self.executor, self.kv_cache, self.scheduler = core.executor, core.kv_cache, core.scheduler
        self.eos_token_ids = core.eos_token_ids
        try:
            self.tokenizer = (None if config.skip_tokenizer_init
                              else load_tokenizer(config.tokenizer or self.resolved.model_path))
            self.generation_config = load_generation_config(self.resolved.model_path)
        except BaseException:
            core.shutdown()                 # tensor-parallel ranks must not outlive a failure
            raise
        self.outputs = OutputProcessor(self.tokenizer, speculative=core.speculative is not None)
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def speculative(self) -> SpeculativeConfig | None:
        return self.core.speculative

    @property
    def proposer(self):
        return self.core.proposer

    @property
    def async_scheduling(self) -> bool:
        """Whether steps may overlap (with speculative decoding, only those in which no
        request verifies drafts or proposes)."""
        return self.core.async_scheduling

    @property
    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Running totals of speculative decoding (None when it is off)."""
        return self.core.spec_decode_stats

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue one request (``n`` sequences). Bad input raises ValueError and
        leaves the running requests untouched."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.outputs.groups:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        text, request = prepare_request(prompt, params, request_id, self.tokenizer,
                                        self.model_config.vocab_size, self.max_model_len)
        seq_ids = self.core.add_request(request)
        self.outputs.add(request_id, text, request.prompt_token_ids, params, seq_ids)
        return request_id

    def abort_request(self, request_ids) -> list[RequestOutput]:
        seq_ids = self.outputs.sequence_ids(request_ids)
        self.core.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
        return self.outputs.finish_aborted(seq_ids)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, stopped = self.outputs.process(self.core.step())
        if stopped:
            self.core.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs

    def shutdown(self) -> None:
        self.core.shutdown()
