"""Prompts -> CoreRequests: tokenized and checked before they reach the engine core, so a bad
request fails alone, with an error naming the field."""
from __future__ import annotations

from loom.engine_core import CoreRequest, check_prompt
from loom.sampling_params import SamplingParams


def prepare_request(prompt: str | list[int], params: SamplingParams, request_id: str, tokenizer,
                    vocab_size: int, max_model_len: int) -> tuple[str | None, CoreRequest]:
    """(the prompt's text, or None for token ids; the CoreRequest). ValueError if bad."""
    if params.stop and tokenizer is None:
        raise ValueError("stop: stop strings need a tokenizer, but skip-tokenizer-init is "
                         "set; use stop_token_ids")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt: text needs a tokenizer, but skip-tokenizer-init is set; "
                             "pass token ids")
        text, token_ids = prompt, (tokenizer.encode(prompt) if prompt else [])
    else:
        text, token_ids = None, list(prompt)
    check_prompt(token_ids, vocab_size, max_model_len)
    return text, CoreRequest(request_id, token_ids, params)
