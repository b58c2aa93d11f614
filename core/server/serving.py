"""The OpenAI endpoints' logic: a request body -> prompts and SamplingParams -> AsyncEngine ->
a response, whole (a dict) or as server-sent events (an async iterator of ``data:`` lines)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loom.async_engine import AsyncEngine, EngineDeadError, RequestStream
from loom.outputs import CompletionOutput, Logprob, RequestOutput
from loom.sampling_params import SamplingParams
from loom.server.protocol import (APIError, ChatMessage, ChatRequest, CompletionRequest,
                                  DetokenizeRequest, SamplingFields, TokenizeRequest, bad_request,
                                  from_value_error, short)

GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
MAX_N = 128
MIN_LOGPROB = -9999.0            # JSON has no -inf
DONE = "data: [DONE]\n\n"
JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))   # one, not one per event
CHAT_NAMES = {"logprobs": "top_logprobs"}   # SamplingParams field -> chat request field


@dataclass
class ServerSettings:
    model_names: list[str]                  # the first is the one responses name
    model_root: str = ""                    # the model directory, shown by /v1/models
    api_key: str | None = None
    chat_template: str | None = None        # overrides the tokenizer's


@dataclass
class Meta:
    """What every response and chunk of one request carries."""
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, object: str, choices: list[dict], usage: dict | None = None,
             with_usage: bool = False) -> dict:
        out = {"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None or with_usage:
            out["usage"] = usage
        return out


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _seen: set = field(default_factory=set)

    def add(self, out: RequestOutput) -> None:
        """Count an output (a delta, or a final cumulative one)."""
        if out.request_id not in self._seen:
            self._seen.add(out.request_id)
            self.prompt_tokens += len(out.prompt_token_ids)
        self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.max_model_len = engine.info.max_model_len
        self.vocab_size = engine.info.vocab_size
        self.tokenizer = engine.tokenizer       # used on the event loop only, as the engine's
        generation = engine.generation_config
        self.defaults = {k: generation[k] for k in GENERATION_DEFAULTS
                         if generation.get(k) is not None}

    # ---- /v1/completions ---------------------------------------------------------------------
    async def completions(self, req: CompletionRequest) -> dict | AsyncIterator[str]:
        model = self.check_model(req.model)
        for name, given in (("echo", req.echo), ("suffix", req.suffix is not None),
                            ("best_of", req.best_of not in (None, req.n))):
            if given:
                raise bad_request(f"{name}: not supported", name)
        params = self.sampling_params(req, req.max_tokens, req.logprobs)
        prompts = [self.encode(p) if isinstance(p, str) else p for p in prompt_items(req.prompt)]
        for ids in prompts:
            self.check_length(len(ids), req.max_tokens, "prompt")
        meta = Meta(f"cmpl-{uuid.uuid4().hex}", model)
        streams = await self.add_all(meta.id, prompts, params, delta=req.stream)
        if req.stream:
            return self.completion_events(streams, req, params, meta)
        outs = await gather_final(streams)
        choices = [self.completion_choice(i * params.n + c.index, c, req, 0)
                   for i, out in enumerate(outs) for c in out.outputs]
        usage = Usage()
        for out in outs:
            usage.add(out)
        return meta.body("text_completion", choices, usage.body())

    async def completion_events(self, streams: list[RequestStream], req: CompletionRequest,
                                params: SamplingParams, meta: Meta) -> AsyncIterator[str]:
        usage, offsets = Usage(), {}
        try:
            async for i, out in merge(streams):
                usage.add(out)
                for c in out.outputs:
                    index = i * params.n + c.index
                    offset = offsets.get(index, 0)
                    choice = self.completion_choice(index, c, req, offset)
                    if choice["logprobs"] is not None:   # as a whole response counts them,
                        tokens = choice["logprobs"]["tokens"]   # however the events split
                        offsets[index] = offset + sum(map(len, tokens))
                    yield sse(meta.body("text_completion", [choice],
                                        with_usage=req.include_usage))
            if req.include_usage:
                yield sse(meta.body("text_completion", [], usage.body()))
        except EngineDeadError as e:
            yield sse(engine_failed(e).body())
        finally:
            close_all(streams)
        yield DONE

    def completion_choice(self, index: int, c: CompletionOutput, req: CompletionRequest,
                          offset: int) -> dict:
        choice = {"index": index, "text": c.text,
                  "logprobs": (completion_logprobs(c, req.logprobs, offset)
                               if c.logprobs is not None else None),
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
        return choice

    # ---- /v1/chat/completions ----------------------------------------------------------------
    async def chat(self, req: ChatRequest) -> dict | AsyncIterator[str]:
        model = self.check_model(req.model)
        if req.tools and req.tool_choice != "none":
            raise bad_request("tools: tool calling is not supported", "tools")
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise bad_request("response_format: only type 'text' is supported", "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs: needs logprobs: true", "top_logprobs")
        top = req.top_logprobs or 0
        max_tokens = (req.max_completion_tokens if req.max_completion_tokens is not None
                      else req.max_tokens)
        names = CHAT_NAMES | ({"max_tokens": "max_completion_tokens"}
                              if req.max_completion_tokens is not None else {})
        params = self.sampling_params(req, max_tokens, top if req.logprobs else None, names)
        prompt = self.chat_prompt(req.messages, req.add_generation_prompt)
        self.check_length(len(prompt), max_tokens, "messages", names.get("max_tokens"))
        meta = Meta(f"chatcmpl-{uuid.uuid4().hex}", model)
        streams = await self.add_all(meta.id, [prompt], params, delta=req.stream)
        if req.stream:
            return self.chat_events(streams, req, params, meta, top)
        (out,) = await gather_final(streams)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c, top) if c.logprobs is not None else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    **({"token_ids": c.token_ids} if req.return_token_ids else {})}
                   for c in out.outputs]
        usage = Usage()
        usage.add(out)
        return meta.body("chat.completion", choices, usage.body())

    async def chat_events(self, streams: list[RequestStream], req: ChatRequest,
                          params: SamplingParams, meta: Meta, top: int) -> AsyncIterator[str]:
        usage = Usage()
        kind = "chat.completion.chunk"
        try:
            for i in range(params.n):
                first = {"index": i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}
                yield sse(meta.body(kind, [first], with_usage=req.include_usage))
            async for _, out in merge(streams):
                usage.add(out)
                for c in out.outputs:
                    choice = {"index": c.index, "delta": {"content": c.text} if c.text else {},
                              "logprobs": chat_logprobs(c, top) if c.logprobs is not None else None,
                              "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                    if req.return_token_ids:
                        choice["token_ids"] = c.token_ids
                    yield sse(meta.body(kind, [choice], with_usage=req.include_usage))
            if req.include_usage:
                yield sse(meta.body(kind, [], usage.body()))
        except EngineDeadError as e:
            yield sse(engine_failed(e).body())
        finally:
            close_all(streams)
        yield DONE

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        """The chat template applied and tokenized, as LLM.chat does it."""
        tokenizer = self.require_tokenizer("messages")
        template = self.settings.chat_template
        if template is None and not tokenizer.chat_template:
            raise bad_request("messages: the model has no chat template; start the server "
                              "with --chat-template", "messages")
        conversation = [message_dict(m, i) for i, m in enumerate(messages)]
        try:
            ids = tokenizer.apply_chat_template(conversation, chat_template=template,
                                                add_generation_prompt=add_generation_prompt,
                                                tokenize=True, return_dict=False)
        except Exception as e:  # noqa: BLE001 - a template that fails on this input is a 400
            raise bad_request(f"messages: the chat template failed: {e}", "messages") from None
        return list(ids)

    # ---- /tokenize, /detokenize, /v1/models ---------------------------------------------------
    def tokenize(self, req: TokenizeRequest) -> dict:
        self.check_model(req.model)
        if req.messages is not None:
            ids = self.chat_prompt(req.messages, req.add_generation_prompt)
        elif req.prompt is not None:
            ids = self.require_tokenizer("prompt").encode(
                req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise bad_request("prompt: give a prompt or messages", "prompt")
        out = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = self.tokenizer.convert_ids_to_tokens(ids)
        return out

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req.model)
        tokenizer = self.require_tokenizer("tokens")
        if any(not 0 <= t < self.vocab_size for t in req.tokens):
            raise bad_request(f"tokens: token ids must be in [0, {self.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    def models(self) -> dict:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "loom",
             "root": self.settings.model_root, "parent": None,
             "max_model_len": self.max_model_len} for name in self.settings.model_names]}

    # ---- shared checks -----------------------------------------------------------------------
    def check_model(self, name: str | None) -> str:
        if name is None:
            return self.settings.model_names[0]
        if name not in self.settings.model_names:
            raise APIError(404, f"The model `{short(name, 80)}` does not exist.", "model",
                           code="model_not_found")
        return name

    def require_tokenizer(self, param: str):
        if self.tokenizer is None:
            raise bad_request(f"{param}: text needs a tokenizer, but the server runs with "
                              "skip-tokenizer-init; send token ids", param)
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self.require_tokenizer("prompt").encode(text)

    def sampling_params(self, req: SamplingFields, max_tokens: int | None,
                        logprobs: int | None, names: dict | None = None) -> SamplingParams:
        """SamplingParams from the body; unset fields take generation_config.json's values.
        ``names``: SamplingParams field -> the request's name for it, for error messages."""
        if req.logit_bias:
            raise bad_request("logit_bias: not supported", "logit_bias")
        if req.n > MAX_N:
            raise bad_request(f"n: must be <= {MAX_N}, got {req.n}", "n")
        values = dict(n=req.n, presence_penalty=req.presence_penalty,
                      frequency_penalty=req.frequency_penalty, seed=req.seed,
                      stop=req.stop or [], stop_token_ids=req.stop_token_ids or [],
                      include_stop_str_in_output=req.include_stop_str_in_output,
                      ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                      skip_special_tokens=req.skip_special_tokens, max_tokens=max_tokens,
                      logprobs=logprobs)
        for key in GENERATION_DEFAULTS:
            value = getattr(req, key)
            value = self.defaults.get(key) if value is None else value
            if value is not None:
                values[key] = value
        try:
            params = SamplingParams(**values)
        except ValueError as e:
            raise renamed(from_value_error(e), names or {}) from None
        if params.stop and self.tokenizer is None:
            raise bad_request("stop: stop strings need a tokenizer, but the server runs with "
                              "skip-tokenizer-init; use stop_token_ids", "stop")
        return params

    def check_length(self, num_prompt: int, max_tokens: int | None, what: str,
                     max_tokens_name: str | None = None) -> None:
        limit = self.max_model_len
        if num_prompt >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but the {what} has "
                f"{num_prompt} tokens, leaving none for the completion. Please reduce the "
                f"length of the {what}.", what, code="context_length_exceeded")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the {what}, "
                f"{max_tokens} in the completion). Please reduce the length of the {what} or "
                "completion.", max_tokens_name or "max_tokens", code="context_length_exceeded")

    async def add_all(self, request_id: str, prompts: list[list[int]], params: SamplingParams,
                      delta: bool) -> list[RequestStream]:
        """Queue one engine request per prompt; if one is refused, abort the others."""
        streams = []
        try:
            for i, prompt in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(await self.engine.add_request(prompt, params, rid, delta))
        except BaseException as e:
            close_all(streams)
            if isinstance(e, ValueError):
                raise from_value_error(e) from None
            raise
        return streams


# ---- helpers -------------------------------------------------------------------------------
def prompt_items(prompt) -> list[str | list[int]]:
    """The prompts of a completion request: a string, strings, token ids, or lists of them."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(is_int(t) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in prompt):
            return prompt
    raise bad_request("prompt: must be a string, a list of strings, a list of token ids or a "
                      "list of lists of token ids (none empty)", "prompt")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def message_dict(message: ChatMessage, i: int) -> dict:
    """A message for the chat template; text parts are joined with newlines."""
    out = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        if any(part.type != "text" or part.text is None for part in content):
            raise bad_request(f"messages[{i}].content: only text parts are supported",
                              "messages")
        content = "\n".join(part.text for part in content)
    out["content"] = content or ""
    return out


def renamed(error: APIError, names: dict) -> APIError:
    if error.param in names:
        new = names[error.param]
        error.message = new + error.message[len(error.param):]
        error.param = new
    return error


def engine_failed(error: EngineDeadError) -> APIError:
    return APIError(500, str(error), type="server_error")


def sse(body: dict) -> str:
    return f"data: {JSON.encode(body)}\n\n"


def close_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


async def gather_final(streams: list[RequestStream]) -> list[RequestOutput]:
    try:
        return list(await asyncio.gather(*(s.final() for s in streams)))
    finally:
        close_all(streams)


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams, as they come."""
    if len(streams) == 1:                   # the common case: no task per output
        async for out in streams[0]:
            yield 0, out
        return
    iters = [aiter(s) for s in streams]
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iters)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iters[i]))] = i
                yield i, out
    finally:
        for task in pending:
            task.cancel()


def _logprob(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB     # -inf and NaN too


def _token(token_id: int, entry: Logprob) -> str:
    return entry.decoded_token if entry.decoded_token is not None else f"token_id:{token_id}"


def completion_logprobs(c: CompletionOutput, num: int, offset: int) -> dict:
    """OpenAI's completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(c.token_ids, c.logprobs):
        sampled = entry[token_id]
        text = _token(token_id, sampled)
        out["tokens"].append(text)
        out["token_logprobs"].append(_logprob(sampled.logprob))
        out["top_logprobs"].append({_token(t, e): _logprob(e.logprob) for t, e in entry.items()
                                    if e.rank <= num or t == token_id})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(c: CompletionOutput, num: int) -> dict:
    """OpenAI's chat shape: content = [{token, logprob, bytes, top_logprobs}]."""
    def info(token_id: int, entry: Logprob) -> dict:
        text = _token(token_id, entry)
        return {"token": text, "logprob": _logprob(entry.logprob),
                "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, entry in zip(c.token_ids, c.logprobs):
        top = sorted(((t, e) for t, e in entry.items() if e.rank <= num), key=lambda x: x[1].rank)
        content.append(info(token_id, entry[token_id]) | {
            "top_logprobs": [info(t, e) for t, e in top[:num]]})
    return {"content": content}
