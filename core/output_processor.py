"""Turns the engine core's per-step SequenceUpdates into RequestOutputs: incremental
detokenization, stop strings, logprobs, and the n sequences of one request gathered together.

It runs where the requests came in: in Engine's process offline, in the server's front end when
the core has a process of its own (then updates that follow a stop string are dropped here,
while the core hears that the sequence ended)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenizers.decoders import DecodeStream

from loom.engine_core import SequenceUpdate
from loom.outputs import CompletionOutput, Logprob, RequestOutput
from loom.sampling_params import SamplingParams
from loom.scheduler_output import TokenLogprobs

DETOKENIZE_CONTEXT = 6   # prompt tokens fed to the decoder first, for the right leading space


@dataclass
class SequenceState:
    seq_id: str
    index: int
    params: SamplingParams
    stream: DecodeStream
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    num_draft_tokens: int = 0           # speculative decoding: drafts verified so far
    num_accepted_tokens: int = 0        # of which accepted


@dataclass
class RequestGroup:
    """One user request: a prompt and its n sequences."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[SequenceState]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    sent_tokens: list[int] | None = None     # delta outputs: token ids / text already sent
    sent_text: list[int] | None = None
    sent_finish: list[bool] | None = None     # and whether its finish was sent

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class OutputProcessor:
    def __init__(self, tokenizer, speculative: bool = False):
        self.tokenizer = tokenizer          # None: token ids only, no text
        self.speculative = speculative      # add draft/accepted token counts to the metrics
        self.backend = tokenizer.backend_tokenizer if tokenizer is not None else None
        self.groups: dict[str, RequestGroup] = {}
        self.seq_of: dict[str, tuple[RequestGroup, SequenceState]] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams, seq_ids: list[str]) -> None:
        context = prompt_token_ids[-DETOKENIZE_CONTEXT:]
        seqs = []
        for i, seq_id in enumerate(seq_ids):
            stream = DecodeStream(context, skip_special_tokens=params.skip_special_tokens)
            seqs.append(SequenceState(seq_id, i, params, stream,
                                      logprobs=[] if params.logprobs is not None else None))
        group = RequestGroup(request_id, prompt, prompt_token_ids, params, seqs,
                             sent_tokens=[0] * len(seqs), sent_text=[0] * len(seqs),
                             sent_finish=[False] * len(seqs))
        self.groups[request_id] = group
        for seq in seqs:
            self.seq_of[seq.seq_id] = (group, seq)

    def sequence_ids(self, request_ids) -> list[str]:
        """The ids of the unfinished requests' sequences."""
        return [s.seq_id for rid in request_ids if (g := self.groups.get(rid)) is not None
                for s in g.sequences]

    def process(self, updates: list[SequenceUpdate]) -> tuple[list[RequestOutput], list[str]]:
        """Outputs of the groups that changed, and sequence ids a stop string ended (for the
        core to finish)."""
        changed: dict[str, RequestGroup] = {}
        stopped: list[str] = []
        now = time.monotonic()
        for update in updates:
            entry = self.seq_of.get(update.seq_id)
            if entry is None or entry[1].finish_reason is not None:
                continue                  # aborted, or ended by a stop string already
            group, seq = entry
            if group.first_token_time is None and update.new_token_ids:
                group.first_token_time = now
            group.last_token_time = now
            if self._append(seq, update):
                stopped.append(seq.seq_id)
            changed[group.request_id] = group
        wanted = [g for g in changed.values()
                  if g.params.output_kind != "final" or g.finished]
        return [self._output(g) for g in wanted], stopped

    def finish_aborted(self, seq_ids: list[str]) -> list[RequestOutput]:
        changed = {}
        for sid in seq_ids:
            entry = self.seq_of.get(sid)
            if entry is not None and entry[1].finish_reason is None:
                entry[1].finish_reason = "abort"
                changed[entry[0].request_id] = entry[0]
        return [self._output(g) for g in changed.values()]

    def _append(self, seq: SequenceState, update: SequenceUpdate) -> bool:
        """Detokenize the new tokens; True if a stop string ended the sequence."""
        params = seq.params
        seq.token_ids += update.new_token_ids
        seq.num_cached_tokens = update.num_cached_tokens
        seq.num_draft_tokens = update.num_draft_tokens
        seq.num_accepted_tokens = update.num_accepted_tokens
        for i, token in enumerate(update.new_token_ids):
            piece = seq.stream.step(self.backend, token) if self.backend is not None else None
            if seq.logprobs is not None and update.logprobs is not None:
                self._add_logprobs(seq, update.logprobs[i])
            if piece:
                old_len = len(seq.text)
                seq.text += piece
                if params.stop and self._check_stop_strings(seq, old_len):
                    extra = len(update.new_token_ids) - i - 1   # tokens past the stop string
                    if extra:
                        del seq.token_ids[-extra:]
                    return True
        if update.finish_reason is not None:
            seq.finish_reason = update.finish_reason
            seq.stop_reason = update.stop_reason
        return False

    def _check_stop_strings(self, seq: SequenceState, old_len: int) -> bool:
        params = seq.params
        for stop in params.stop:
            # Only a match that ends in the new text can be new.
            start = max(0, old_len - len(stop) + 1)
            pos = seq.text.find(stop, start)
            if pos != -1:
                end = pos + len(stop) if params.include_stop_str_in_output else pos
                seq.text = seq.text[:end]
                seq.finish_reason = "stop"
                seq.stop_reason = stop
                return True
        return False

    def _add_logprobs(self, seq: SequenceState, entry: TokenLogprobs) -> None:
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda ids: None)
        position = {tid: Logprob(lp, rank + 1, decode([tid]))
                    for rank, (tid, lp) in enumerate(zip(entry.top_token_ids, entry.top_logprobs))}
        position[entry.sampled_token_id] = Logprob(entry.sampled_logprob, entry.sampled_rank,
                                                   decode([entry.sampled_token_id]))
        seq.logprobs.append(position)
        seq.cumulative_logprob += entry.sampled_logprob

    def _output(self, group: RequestGroup) -> RequestOutput:
        """Cumulative (or, for output_kind "delta", only what is new since the last output)."""
        params = group.params
        delta = params.output_kind == "delta"
        # A delta holds back the text a stop string completed later would cut off.
        holdback = 0 if params.include_stop_str_in_output else max(map(len, params.stop),
                                                                   default=1) - 1
        outputs = []
        for s in group.sequences:
            tok0 = group.sent_tokens[s.index] if delta else 0
            text0 = group.sent_text[s.index] if delta else 0
            end = len(s.text)
            if delta and s.finish_reason is None:
                end = max(text0, end - holdback)
            tokens = s.token_ids
            if delta and (group.sent_finish[s.index] or (
                    end == text0 and len(tokens) == tok0 and s.finish_reason is None)):
                continue                       # a delta carries only what changed, once
            group.sent_finish[s.index] = s.finish_reason is not None
            outputs.append(CompletionOutput(
                index=s.index, text=s.text[text0:end], token_ids=tokens[tok0:],
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                logprobs=s.logprobs[tok0:] if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None))
            group.sent_tokens[s.index], group.sent_text[s.index] = len(tokens), end
        finished = group.finished
        metrics = {"arrival_time": group.arrival_time, "first_token_time": group.first_token_time,
                   "last_token_time": group.last_token_time}
        if self.speculative:
            metrics["spec_num_draft_tokens"] = sum(s.num_draft_tokens for s in group.sequences)
            metrics["spec_num_accepted_tokens"] = sum(s.num_accepted_tokens
                                                      for s in group.sequences)
        out = RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs,
                            finished, group.sequences[0].num_cached_tokens, metrics)
        if finished:
            self._forget(group)
        return out

    def _forget(self, group: RequestGroup) -> None:
        self.groups.pop(group.request_id, None)
        for s in group.sequences:
            self.seq_of.pop(s.seq_id, None)
