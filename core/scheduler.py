"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Every request catches ``num_computed_tokens`` up to ``num_tokens``. Each step first serves the
running requests in arrival order (a decode needs one token, an unfinished prompt its next
chunk), then admits waiting requests FCFS while budget, sequence slots and KV blocks last. When
blocks run out, the newest running request is preempted: its blocks are freed and it waits at
the head of the queue, to be recomputed (its prompt and outputs so far) when it resumes.

With async scheduling the next step is scheduled before this step's tokens reach the host: a
request that samples holds an output *placeholder* until update() brings the token, and the
next step already computes that position (the runner feeds the token on the device).

Speculative decoding: a request's drafts are scheduled as extra tokens after its last one, with
KV slots reserved for them and for the proposer's lookahead. update() appends the accepted
drafts and the token after them (stopping where plain decoding would), rolls
num_computed_tokens back over the rejected ones and frees their blocks. With ``pad_drafts``
(the runner has verification graphs), a step where any request verifies drafts gives every
decoding request k of them, padded with PAD_DRAFT (never accepted), so the batch is uniform and
replays a graph. A request whose drafts keep being rejected backs off (draft_backoff): it
decodes without drafts for a growing number of steps, then tries again. Those steps count down
as they are scheduled, and the runner proposes nothing in a step whose successor is one of them
(SchedulerOutput.backoff_req_ids).

Async scheduling with speculative decoding: a step is scheduled ahead of the previous one's
tokens only when no request with a token in flight verifies drafts or proposes in it (every
such request is in backoff), since both need that token on the host; otherwise the previous
step is completed first (needs_host_tokens).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from loom.kv_cache import KVCacheManager
from loom.request import Request, RequestStatus
from loom.scheduler_output import (CachedRequestData, ModelRunnerOutput, NewRequestData,
                                   SchedulerOutput, TokenLogprobs)
from loom.spec_decode.stats import SpecDecodeStats

PAD_DRAFT = -1     # a draft slot with no proposal: verified like none, never accepted
MAX_DRAFT_BACKOFF = 32


def draft_backoff(num_missed: int) -> int:
    """Steps a request decodes without drafts after ``num_missed`` verifications in a row
    that accepted none: none after up to three (a low but useful acceptance misses that often),
    then 1, 2, 4, ... up to MAX_DRAFT_BACKOFF. A request whose drafts keep failing costs a
    verification about every MAX_DRAFT_BACKOFF steps instead of every step; one accepted
    draft resets it."""
    return 0 if num_missed < 4 else min(1 << (num_missed - 4), MAX_DRAFT_BACKOFF)


@dataclass
class RequestUpdate:
    """What one step did to one request: the tokens it appended and whether it finished."""
    request: Request
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    spec_decode: SpecDecodeStats | None = None


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, *, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int,
                 enable_chunked_prefill: bool = True, async_scheduling: bool = False,
                 num_spec_tokens: int = 0, num_lookahead_tokens: int = 0,
                 pad_drafts: bool = False):
        self.kv = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.async_scheduling = async_scheduling
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_ids: set[str] = set()     # to tell the runner next step
        self._sent_tokens: dict[str, int] = {}   # tokens of each request the runner knows
        self.num_spec_tokens = num_spec_tokens             # k; 0: no speculative decoding
        self.num_lookahead_tokens = num_lookahead_tokens   # KV slots the proposer writes
        self.pad_drafts = pad_drafts
        self.spec_stats = SpecDecodeStats() if num_spec_tokens else None

    # ---- requests in and out -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.num_prompt_tokens == 0:
            raise ValueError("prompt: must contain at least one token")
        if request.num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt: {request.num_prompt_tokens} tokens, but max-model-len is "
                f"{self.max_model_len} and at least one token must be generated")
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids, status: RequestStatus) -> list[Request]:
        """Stop requests from outside a step (abort, stop string found by the detokenizer)."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv.free(req)
        del self.requests[req.request_id]
        if self._sent_tokens.pop(req.request_id, None) is not None:
            self._finished_ids.add(req.request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = set()
        budget = self.max_num_batched_tokens
        preempted = False
        pad = self.pad_drafts and any(r.spec_token_ids and r.spec_token_ids[0] != PAD_DRAFT
                                      for r in self.running)    # real drafts come first
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._reached_limit(req):        # finishes when its pending token arrives
                i += 1
                continue
            if pad:
                self._pad_drafts(req)
            num_new = min(self._num_tokens(req) + len(req.spec_token_ids)
                          - req.num_computed_tokens, budget)
            lookahead = self._lookahead(req, req.num_computed_tokens + num_new)
            kept = len(self.kv.block_ids(req.request_id))
            new_blocks = self.kv.allocate_slots(req, num_new, num_lookahead_tokens=lookahead)
            while new_blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                new_blocks = self.kv.allocate_slots(req, num_new, num_lookahead_tokens=lookahead)
            if new_blocks is None:
                break
            out.cached_requests.append(self._cached_data(req, new_blocks, kept))
            self._schedule(out, req, num_new)
            budget -= num_new
            i += 1
        if not preempted:
            budget = self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.num_output_placeholders:     # preempted with a token in flight: wait for it
                break
            hits, num_hit = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            new_blocks = self.kv.allocate_slots(req, num_new, hits,
                                                self._lookahead(req, num_hit + num_new))
            if new_blocks is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_hit
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit
            self.running.append(req)
            out.new_requests.append(NewRequestData(
                req.request_id, req.prompt_token_ids, list(req.output_token_ids),
                req.sampling_params, req.seed, list(new_blocks), num_hit))
            self._sent_tokens[req.request_id] = req.num_tokens
            self._schedule(out, req, num_new)
            budget -= num_new
        return budget

    def _schedule(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        out.num_scheduled_tokens[req.request_id] = num_new
        out.total_num_scheduled_tokens += num_new
        req.num_computed_tokens += num_new
        num_drafts = req.num_computed_tokens - self._num_tokens(req)   # the budget may cut them
        if num_drafts > 0:
            out.scheduled_spec_tokens[req.request_id] = req.spec_token_ids[:num_drafts]
        # Blocks filled by this step are findable at once: a request admitted later in this
        # same step (an n > 1 sibling, a shared prefix) reuses them, since every layer writes
        # the step's K/V before attention reads them.
        self.kv.cache_blocks(req)
        if num_drafts >= 0 and req.draft_backoff:     # it samples: a step of its backoff
            req.draft_backoff -= 1
            if req.draft_backoff:                     # so is the next: propose nothing
                out.backoff_req_ids.add(req.request_id)
        if self.async_scheduling and num_drafts == 0:
            req.num_output_placeholders += 1    # it samples: the token stays on the device

    def _pad_drafts(self, req: Request) -> None:
        """Up to k drafts for a decoding request, as far as max-model-len leaves room."""
        if req.num_computed_tokens == req.num_tokens - 1:
            room = min(self.num_spec_tokens, self.max_model_len - req.num_tokens - 1)
            req.spec_token_ids = req.spec_token_ids + [PAD_DRAFT] * (room -
                                                                      len(req.spec_token_ids))

    def _lookahead(self, req: Request, end: int) -> int:
        """KV slots past ``end`` to reserve: the proposer's, for a request that samples and
        proposes (its next step is not one of its backoff)."""
        if not self.num_lookahead_tokens or end < self._num_tokens(req) or req.draft_backoff > 1:
            return 0
        return max(0, min(self.num_lookahead_tokens, self.max_model_len - end))

    @staticmethod
    def _num_tokens(req: Request) -> int:
        return req.num_tokens + req.num_output_placeholders

    def _reached_limit(self, req: Request) -> bool:
        """Its in-flight tokens already reach max_tokens or max-model-len."""
        pending = req.num_output_placeholders
        return pending > 0 and (req.num_output_tokens + pending >= req.max_tokens
                                or req.num_tokens + pending >= self.max_model_len)

    def needs_host_tokens(self) -> bool:
        """The next step must not be scheduled before the in-flight step's tokens are known:
        a running request samples from its output token ids (penalties), or (speculative
        decoding) verifies drafts or proposes in the next step."""
        return any(r.sampling_params.needs_penalties or self._may_draft(r) for r in self.running)

    def _may_draft(self, req: Request) -> bool:
        """It has drafts to verify, or its token is in flight and it verifies or proposes in
        the next step (fewer than two steps of backoff left)."""
        return bool(self.num_spec_tokens) and bool(
            req.spec_token_ids or (req.num_output_placeholders and req.draft_backoff < 2))

    def _cached_data(self, req: Request, new_blocks: list[int],
                     num_kept_blocks: int) -> CachedRequestData:
        sent = self._sent_tokens[req.request_id]
        new_tokens = req.token_slice(sent, req.num_tokens) if sent < req.num_tokens else []
        self._sent_tokens[req.request_id] = req.num_tokens
        return CachedRequestData(req.request_id, new_tokens, new_blocks, req.num_computed_tokens,
                                 num_kept_blocks)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        if self._sent_tokens.pop(req.request_id, None) is not None:
            self._finished_ids.add(req.request_id)   # the runner drops it; it comes back as new
        self.waiting.appendleft(req)

    # ---- after the step ------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestUpdate]:
        updates = []
        for idx, rid in enumerate(result.req_ids):
            req = self.requests.get(rid)
            if req is None:                         # finished while its step was in flight
                continue
            tokens = result.sampled_token_ids[idx]
            drafts = sched.scheduled_spec_tokens.get(rid)
            if drafts:
                self._roll_back(req, drafts, len(tokens) - 1)
            elif self.async_scheduling:
                req.num_output_placeholders -= 1    # the token it held a place for
            logprobs = result.logprobs[idx] if result.logprobs else None
            new_tokens = []
            status = None
            for token in tokens:
                req.output_token_ids.append(token)
                new_tokens.append(token)
                status = self._check_stop(req, token)
                if status is not None:
                    break
            if logprobs is not None:
                logprobs = logprobs[:len(new_tokens)]
            updates.append(RequestUpdate(req, new_tokens, logprobs))
            if status is not None:
                # A request preempted while its step was in flight waits in the queue.
                (self.running if req.status == RequestStatus.RUNNING else self.waiting).remove(req)
                self._finish(req, status)
            elif self.num_spec_tokens and req.status == RequestStatus.RUNNING:  # not preempted
                proposals = result.spec_token_ids[idx] if result.spec_token_ids else []
                self._take_proposals(req, [] if rid in sched.backoff_req_ids else proposals)
        return updates

    def _roll_back(self, req: Request, drafts: list[int], num_accepted: int) -> None:
        """The KV of rejected drafts is void: the request recomputes from its first one."""
        req.num_computed_tokens -= len(drafts) - num_accepted
        proposed = sum(1 for d in drafts if d != PAD_DRAFT)
        if proposed:
            req.num_draft_tokens += proposed
            req.num_accepted_tokens += num_accepted
            self.spec_stats.observe(proposed, num_accepted)
            req.num_missed_drafts = 0 if num_accepted else req.num_missed_drafts + 1
            req.draft_backoff = draft_backoff(req.num_missed_drafts)

    def _take_proposals(self, req: Request, proposals: list[int]) -> None:
        """Drafts for the next step, as many as could still be emitted after one more token
        (none if the next step is one of its backoff); blocks past the request's tokens go
        back to the pool until the next step asks."""
        room = min(req.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens)
        if req.draft_backoff:
            room = 0
        req.spec_token_ids = list(proposals[:max(room - 1, 0)])
        self.kv.free_tail(req, req.num_tokens)

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        num_out = req.num_output_tokens
        if num_out >= params.min_tokens:
            if token in req.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if num_out >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.kv.usage,
                              self.num_preemptions, self.kv.prefix_queries, self.kv.prefix_hits,
                              self.spec_stats.copy() if self.spec_stats else None)
