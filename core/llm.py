"""LLM: the offline API. ``LLM(model=path, **config).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import dataclasses
import logging

from tqdm.auto import tqdm

from loom.config import build_config
from loom.engine import Engine
from loom.frozen_heap import frozen_heap
from loom.outputs import RequestOutput
from loom.sampling_params import SamplingParams
from loom.spec_decode.stats import SpecDecodeStats

Conversation = list[dict]
logger = logging.getLogger("loom")


class LLM:
    def __init__(self, model: str, **config):
        self.config = build_config({"model": model, **config})
        self.engine = Engine(self.config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    @property
    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Speculative decoding totals since the LLM was built (None when it is off)."""
        stats = self.engine.spec_decode_stats
        return stats.copy() if stats is not None else None

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults."""
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        gen = self.engine.generation_config
        return SamplingParams(**{k: gen[k] for k in keys if gen.get(k) is not None})

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings, or lists of token ids); outputs come back
        in the order of the prompts."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        # Offline, only finished outputs are wanted: no per-step copies of every sequence.
        sampling_params = [dataclasses.replace(p, output_kind="final") for p in sampling_params]
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params: {len(sampling_params)} given for "
                             f"{len(prompts)} prompts")
        ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                ids.append(self.engine.add_request(prompt, params))
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, chat_template, add_generation_prompt)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: Conversation, chat_template: str | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        tokenizer = self.engine.tokenizer
        if chat_template is None and not tokenizer.chat_template:
            raise ValueError("chat: the tokenizer has no chat template; pass chat_template=")
        ids = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                            add_generation_prompt=add_generation_prompt,
                                            tokenize=True, return_dict=False)
        return list(ids)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        before = self.spec_decode_stats
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            with frozen_heap():
                while len(done) < len(ids):
                    for out in self.engine.step():
                        if out.finished and out.request_id in wanted:
                            done[out.request_id] = out
                            bar.update(1)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            bar.close()
        if before is not None:
            logger.info("%s", self.engine.spec_decode_stats.since(before).summary())
        return [done[i] for i in ids]
