"""Prometheus metrics, named as vLLM names them with a ``loom:`` prefix.

Metrics.on_step runs on the event loop after every step's outputs arrive: it sets the scheduler
gauges, turns the scheduler's running totals into counter increments, and times each request's
tokens (TTFT, inter-token latency, end-to-end) from the outputs of the step (or of the steps a
front end that fell behind processed as one: then one inter-token gap spans them). With speculative
decoding it also counts drafts, draft tokens and accepted tokens (in all and by draft position),
from the totals the scheduler's figures carry.
"""
from __future__ import annotations

import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

from loom.outputs import RequestOutput
from loom.scheduler import SchedulerStats
from loom.spec_decode.stats import SpecDecodeStats

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000]
COUNTED = ("num_preemptions", "prefix_queries", "prefix_hits")   # running totals of the scheduler


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, speculative: bool = False):
        self.registry = r = CollectorRegistry()
        label = ["model_name"]

        def gauge(name, doc):
            return Gauge(name, doc, label, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, label, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, label, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("loom:num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("loom:num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("loom:kv_cache_usage_perc",
                              "KV-cache usage: the share of blocks held (1 = all).")
        self.counters = {
            "num_preemptions": counter("loom:num_preemptions", "Preemptions (by recompute)."),
            "prefix_queries": counter("loom:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache."),
            "prefix_hits": counter("loom:prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache."),
        }
        self.prompt_tokens = counter("loom:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("loom:generation_tokens", "Tokens generated.")
        self._success = Counter("loom:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.model_name = model_name
        self.ttft = histogram("loom:time_to_first_token_seconds",
                              "Arrival to the first generated token.", TTFT_BUCKETS)
        self.itl = histogram("loom:inter_token_latency_seconds",
                             "Time between the steps that give a request new tokens.",
                             ITL_BUCKETS)
        self.e2e = histogram("loom:e2e_request_latency_seconds",
                             "Arrival to the last token.", E2E_BUCKETS)
        self.request_prompt = histogram("loom:request_prompt_tokens",
                                        "Prompt tokens per request.", TOKEN_BUCKETS)
        self.request_generation = histogram("loom:request_generation_tokens",
                                            "Generated tokens per request.", TOKEN_BUCKETS)
        self._totals = dict.fromkeys(COUNTED, 0)
        self._seen: dict[str, tuple[int, float]] = {}   # request -> (tokens so far, last time)
        self.spec_counters = None
        if speculative:
            self.spec_counters = {
                "num_drafts": counter("loom:spec_decode_num_drafts",
                                      "Verifications of drafts (one per request and step)."),
                "num_draft_tokens": counter("loom:spec_decode_num_draft_tokens",
                                            "Draft tokens verified."),
                "num_accepted_tokens": counter("loom:spec_decode_num_accepted_tokens",
                                               "Draft tokens accepted."),
            }
            self._per_position = Counter(
                "loom:spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted, by their position among the request's drafts.",
                ["model_name", "position"], registry=r)
        self._spec_before = SpecDecodeStats()

    def on_step(self, stats: SchedulerStats | None, outputs: list[RequestOutput]) -> None:
        """After each step (the scheduler's figures then) and each abort (stats None)."""
        if stats is not None:
            self._set_scheduler_figures(stats)
        now = time.monotonic()
        generated = 0
        for out in outputs:
            generated += self._observe(out, now)
        if generated:
            self.generation_tokens.inc(generated)

    def _set_scheduler_figures(self, stats: SchedulerStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        for name, counter in self.counters.items():
            total = getattr(stats, name)
            if total > self._totals[name]:
                counter.inc(total - self._totals[name])
            self._totals[name] = total
        if self.spec_counters is not None and stats.spec_decode is not None:
            self._count_spec(stats.spec_decode)

    def _count_spec(self, totals: SpecDecodeStats) -> None:
        new = totals.since(self._spec_before)
        for name, counter in self.spec_counters.items():
            if getattr(new, name):
                counter.inc(getattr(new, name))
        for position, count in enumerate(new.accepted_per_position):
            if count:
                self._per_position.labels(self.model_name, str(position)).inc(count)
        self._spec_before = totals.copy()

    def _observe(self, out: RequestOutput, now: float) -> int:
        """Time the request's new tokens; how many there are."""
        before, last = self._seen.get(out.request_id, (0, 0.0))
        num_tokens = before + sum(len(c.token_ids) for c in out.outputs)   # outputs are deltas
        arrival = out.metrics.get("arrival_time", now)
        if num_tokens > before:
            if before == 0:
                self.ttft.observe(now - arrival)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
            else:
                self.itl.observe(now - last)
            last = now
        self._seen[out.request_id] = (num_tokens, last)
        if out.finished:
            del self._seen[out.request_id]
            reason = out.outputs[0].finish_reason if out.outputs else None
            self._success.labels(self.model_name, reason or "abort").inc()
            self.e2e.observe(now - arrival)
            self.request_prompt.observe(len(out.prompt_token_ids))
            self.request_generation.observe(num_tokens)
        return num_tokens - before

    def render(self) -> bytes:
        return generate_latest(self.registry)
