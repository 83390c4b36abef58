"""OutputProcessor: what a step sampled → RequestOutput deltas (detokenize, stop strings, logprobs,
finish), for the requests in flight, which it holds."""

from __future__ import annotations

import time
from dataclasses import dataclass

from model.tokenizer import Tokenizer
from scheduler.outputs import CompletionOutput, RequestMetrics, RequestOutput
from scheduler.scheduler import SampledToken, Scheduler
from scheduler.sequence import Sequence, SequenceStatus


@dataclass(slots=True, eq=False)
class Request:
    """A request's n sequences plus what its outputs repeat (prompt ids, metrics)."""

    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class OutputProcessor:
    """Runs on the engine's step thread after `Scheduler.update`; the engine adds and aborts."""

    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler  # finishes a sample whose stop string its detokenizer found
        self.requests: dict[str, Request] = {}
        self.prompt_tokens_total = 0  # vLLM's counting: a request's prompt at its first token
        self.generation_tokens_total = 0

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req

    def process(self, sampled: list[SampledToken], gaps: list[float]) -> list[RequestOutput]:
        """Detokenize new tokens (a stop string may finish a sample), group them per request and
        append to `gaps` one inter-token latency per request that already had a token."""
        now = time.monotonic()
        changed: dict[str, list[CompletionOutput]] = {}
        cut: set[int] = set()  # sequences a stop string ended: their later tokens are dropped
        for st in sampled:
            seq, params = st.seq, st.seq.params
            if id(seq) in cut:
                continue
            self.generation_tokens_total += 1
            metrics = seq.metrics
            if seq.request_id not in changed:  # the request's first token of this step
                if metrics.first_token_time is None:
                    metrics.first_token_time = now
                    self.prompt_tokens_total += seq.num_prompt_tokens
                else:
                    gaps.append(now - metrics.last_token_time)
            metrics.last_token_time = now
            # a grammar that completes also stops, but its last token is text, not a stop token
            length = seq.num_tokens if st.num_tokens is None else st.num_tokens
            last = length == seq.num_tokens  # NOTE: the step's last token of the sample
            stopped_by_token = (
                last
                and seq.status == SequenceStatus.FINISHED_STOPPED
                and (
                    seq.matcher is None
                    or st.token_id in params.stop_token_ids
                    or st.token_id in self.tokenizer.eos_token_ids
                )
            )
            hidden = stopped_by_token and not (
                params.include_stop_str_in_output and st.token_id in params.stop_token_ids
            )
            text, stop_str = seq.detokenizer.step([] if hidden else [st.token_id])
            if stop_str is not None:
                seq.stop_reason = stop_str
                del seq.token_ids[length:]  # NOTE: accepted draft tokens after it
                cut.add(id(seq))
                self.scheduler.finish([seq], SequenceStatus.FINISHED_STOPPED)
            elif last and seq.is_finished:
                text += seq.detokenizer.flush()
            logprobs = None
            if params.logprobs is not None:
                # NOTE: report only tokens whose text was returned: none held back for a possible
                # stop string, none past a stop string, no hidden stop token
                seq.output_logprobs.append(st.logprob)
                end = min(seq.detokenizer.num_returned_tokens, len(seq.output_logprobs))
                logprobs = seq.output_logprobs[seq.num_logprobs_reported : end] or None
                seq.num_logprobs_reported = max(end, seq.num_logprobs_reported)
            _add_delta(
                changed.setdefault(seq.request_id, []),
                CompletionOutput(
                    index=seq.sample_index,
                    text=text,
                    token_ids=[st.token_id],
                    logprobs=logprobs,
                    num_tokens=seq.num_output_tokens,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                ),
            )
        outputs = []
        for rid, outs in changed.items():
            req = self.requests[rid]
            finished = req.finished
            if finished:
                req.metrics.finished_time = now
                del self.requests[rid]
            outputs.append(self._request_output(req, outs, finished))
        return outputs

    def process_pooled(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """The one output of each pooling request whose prompt finished this step."""
        now, outputs = time.monotonic(), []
        for seq in seqs:
            req = self.requests.pop(seq.request_id)
            req.metrics.first_token_time = req.metrics.finished_time = now
            self.prompt_tokens_total += seq.num_prompt_tokens
            out = self._request_output(
                req, [CompletionOutput(0, "", [], None, 0, seq.finish_reason)], True
            )
            out.embedding = seq.pooled
            outputs.append(out)
        return outputs

    def _request_output(
        self, req: Request, outs: list[CompletionOutput], finished: bool, error: str | None = None
    ) -> RequestOutput:
        lead = req.seqs[0]
        prompt_lps = None
        if lead.wants_prompt_logprobs and any(o.index == 0 and o.num_tokens == 1 for o in outs):
            prompt_lps = [None, *lead.prompt_logprobs]  # NOTE: with sample 0's first token
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=finished,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
            metrics=req.metrics,
            error=error,
            prompt_logprobs=prompt_lps,
        )

    def finish_request(
        self,
        request_id: str,
        status: SequenceStatus = SequenceStatus.FINISHED_ABORTED,
        error: str | None = None,
    ) -> RequestOutput | None:
        """Finish every unfinished sample of a request now (abort or error); free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None  # already finished, or never existed
        live = [s for s in req.seqs if not s.is_finished]
        self.scheduler.finish(live, status)
        req.metrics.finished_time = time.monotonic()
        outs = [
            CompletionOutput(s.sample_index, "", [], None, s.num_output_tokens, s.finish_reason)
            for s in live
        ]
        return self._request_output(req, outs, True, error)


def _add_delta(outs: list[CompletionOutput], out: CompletionOutput) -> None:
    """Append a sample's delta, or fold it into the sample's previous one of this step (a
    speculating sequence gets several tokens a step)."""
    last = outs[-1] if outs else None
    if last is None or last.index != out.index:
        outs.append(out)
        return
    last.text += out.text
    last.token_ids += out.token_ids
    if out.logprobs is not None:
        last.logprobs = (last.logprobs or []) + out.logprobs
    last.num_tokens, last.finish_reason = out.num_tokens, out.finish_reason
    last.stop_reason = out.stop_reason
