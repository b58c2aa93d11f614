"""The OpenAI request bodies (pydantic) and errors in OpenAI's shape.

Fields follow OpenAI's API; loom's extras (top_k, min_p, repetition_penalty, ignore_eos,
min_tokens, stop_token_ids, ...) ride in the same body, as vLLM's do. Unknown fields are
ignored. Ranges are checked by SamplingParams, whose errors name the field.
"""
from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_MESSAGE = 300          # error messages never carry more than this of anything


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, short(message), param, type
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def short(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code=code)


def from_value_error(error: ValueError) -> APIError:
    """SamplingParams and Engine.add_request errors start with the field: "max_tokens: ..."."""
    message = str(error)
    match = re.match(r"([a-z_]+): ", message)
    return bad_request(message, match.group(1) if match else None)


# ---- request bodies ----------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat share: the model, sampling, stopping and streaming."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False      # loom/vLLM extra: token ids in each choice

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Any = None                  # str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict] | None = None
    tool_choice: Any = None
    response_format: dict | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


# ---- parsing -------------------------------------------------------------------------------
def parse_json(raw: bytes) -> dict:
    """The body as a JSON object; 400 for bytes that are not UTF-8, malformed JSON, NaN or
    Infinity, and anything but an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}") from None
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_model(cls: type[BaseModel], data: dict) -> BaseModel:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        error = e.errors(include_url=False, include_input=False, include_context=False)[0]
        path = _path(error["loc"])
        raise bad_request(f"{path}: {error['msg']}", path.split(".")[0].split("[")[0] or None)


_TYPE_TAGS = re.compile(r"^(str|int|float|bool|list|dict|none|list\[.*\]|dict\[.*\]|"
                        r"[A-Z]\w*|function-\w+\[.*\])$")


def _path(loc: tuple) -> str:
    """'messages[0].content' from a pydantic location, without union member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAGS.match(part):
            out += ("." if out else "") + part
    return out or "body"
