"""SamplingParams: how one request's tokens are chosen and when it stops."""
from __future__ import annotations

from dataclasses import dataclass, field


def _fail(name: str, allowed: str, value) -> None:
    raise ValueError(f"{name}: must be {allowed}, got {value!r}")


OUTPUT_KINDS = ("cumulative", "delta", "final")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16         # None: up to max-model-len
    min_tokens: int = 0
    logprobs: int | None = None         # top-N logprobs per generated token (plus the sampled one)
    skip_special_tokens: bool = True
    output_kind: str = "cumulative"     # per step: "cumulative" outputs, "delta" or "final" only

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            _fail("n", "an integer >= 1", self.n)
        if not is_num(self.temperature) or self.temperature < 0:
            _fail("temperature", "a number >= 0", self.temperature)
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            _fail("top_p", "a number in (0, 1]", self.top_p)
        if not is_int(self.top_k) or self.top_k < 0:
            _fail("top_k", "an integer >= 1, or 0 / -1 to disable", self.top_k)
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            _fail("min_p", "a number in [0, 1]", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_num(value) or not -2 <= value <= 2:
                _fail(name, "a number in [-2, 2]", value)
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            _fail("repetition_penalty", "a number > 0", self.repetition_penalty)
        if self.seed is not None and not is_int(self.seed):
            _fail("seed", "an integer or None", self.seed)
        if not all(isinstance(s, str) and s for s in self.stop):
            _fail("stop", "a list of non-empty strings", self.stop)
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", "a list of non-negative integers", self.stop_token_ids)
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            _fail("max_tokens", "an integer >= 1 or None", self.max_tokens)
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            _fail("min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.output_kind not in OUTPUT_KINDS:
            _fail("output_kind", "one of " + ", ".join(OUTPUT_KINDS), self.output_kind)
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            _fail("logprobs", "an integer in [0, 20] or None", self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def plain_greedy(self) -> bool:
        """Argmax alone decides the token: no penalties, logprobs or min_tokens."""
        return (self.greedy and not self.needs_penalties and self.logprobs is None
                and self.min_tokens == 0)

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)
