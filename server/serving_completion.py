"""/v1/completions: prompts → engine.generate → choices (legacy logprobs, echo), usage, chunks."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from scheduler import TokenLogprob
from scheduler.errors import SamplingParamsError
from server.accumulator import LOGPROB_FLOOR
from server.protocol.base import PromptLogprobs
from server.protocol.completions import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
)
from server.serving_engine import (
    OpenAIServing,
    capture_prompt_logprobs,
    vllm_prompt_logprobs,
)

if TYPE_CHECKING:
    from scheduler.outputs import CompletionOutput, RequestOutput
    from server.accumulator import RequestAccumulator

_UTF8 = codecs.getincrementaldecoder("utf-8")

# one legacy logprob entry: token, its logprob, top logprobs (incl. the token), text_offset; an
# echoed prompt's first token has None for both
_Entry = tuple[str, float | None, dict[str, float] | None, int]


@dataclass(slots=True)
class _Offset:
    """Where a choice's next token starts in its text (legacy logprobs' text_offset)."""

    offset: int = 0
    # the token bytes decoded so far: text_offset advances by the characters a token completes
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: _UTF8(errors="replace"))


def _legacy(entries: list[_Entry]) -> CompletionLogProbs:
    """Legacy shape: parallel lists tokens, token_logprobs, top_logprobs, text_offset."""
    cols = [list(col) for col in zip(*entries, strict=True)] or [[], [], [], []]
    tokens, logprobs, tops, offsets = cols
    return CompletionLogProbs(
        tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets
    )


class OpenAIServingCompletion(OpenAIServing):
    prefix = "cmpl"

    async def _create(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator:
        base = self.sampling_params(req)
        prompts = await self.offload(self._prompt_ids, req.prompt)  # NOTE: tokenizing is heavy
        params = [self.fit_params(len(p), base, "prompt") for p in prompts]
        echo = [""] * len(prompts)
        if req.echo:
            echo = await self.offload(self._echo_texts, req.prompt, prompts)
        n = base.n
        offsets = [_Offset(len(echo[i // n])) for i in range(len(prompts) * n)]
        head, acc, stream = await self.start(req, prompts, params, partial(self._logprobs, offsets))
        prompt_lps: dict[int, list] = {}  # prompt index -> its prompt logprobs (first None)
        stream = capture_prompt_logprobs(stream, prompt_lps)
        if req.stream:

            def prompt_entries(p: int) -> list[_Entry]:
                """The echo's entries, with a choice's first chunk (its prompt logprobs came)."""
                return self._prompt_entries(prompts[p], prompt_lps.get(p)) if req.echo else []

            return self._stream(req, head, acc, stream, echo, prompt_entries)
        await acc.drain(stream)
        # NOTE: a long prompt's logprobs are many token texts: made off the event loop, once
        per_prompt = await self.offload(self._prompt_outputs, req, prompts, prompt_lps)
        choices = []
        for i, c in enumerate(acc.choices):
            gen = not req.echo_only
            entries, vllm = per_prompt[i // n]
            entries = entries + (c.logprobs if gen else [])
            choices.append(
                CompletionChoice(
                    index=i,
                    text=echo[i // n] + (c.text if gen else ""),
                    logprobs=_legacy(entries) if req.logprobs is not None else None,
                    finish_reason=c.finish_reason,
                    prompt_logprobs=vllm,
                )
            )
        usage = acc.usage()
        if req.echo_only:  # the one sampled token is not part of the answer
            usage.completion_tokens, usage.total_tokens = 0, usage.prompt_tokens
        return CompletionResponse(**head, choices=choices, usage=usage, timings=acc.timings())

    def _stream(
        self,
        req: CompletionRequest,
        head: dict[str, Any],
        acc: RequestAccumulator,
        stream: AsyncIterator[tuple[int, RequestOutput]],
        echo: list[str],
        prompt_entries: Callable[[int], list[_Entry]],
    ) -> AsyncIterator[CompletionResponse]:
        """Chunks: echo (and its logprobs) before a choice's first text; nothing for an empty
        delta; echo with max_tokens 0 leaves the sampled token out."""
        started: set[int] = set()
        n = acc.n

        def chunk_choices(i: int, co: CompletionOutput, entries: list | None) -> list:
            text, finish = ("" if req.echo_only else co.text), co.finish_reason
            entries = None if req.echo_only else entries
            if req.echo_only:  # the sampled token is not part of the answer, nor of its usage
                acc.choices[i].num_tokens = 0
            if i not in started:
                started.add(i)
                text = echo[i // n] + text
                if req.logprobs is not None:
                    entries = prompt_entries(i // n) + (entries or [])
            if not text and finish is None and entries is None:
                return []
            lps = _legacy(entries) if entries is not None else None
            return [CompletionChoice(index=i, text=text, logprobs=lps, finish_reason=finish)]

        return self.chunks(req, head, acc, stream, CompletionResponse, chunk_choices)

    def _prompt_ids(self, prompt: str | list) -> list[list[int]]:
        """Token ids per prompt (runs off the event loop); ids outside the vocabulary are a 400."""
        tok = self.engine.tokenizer
        texts = [prompt] if isinstance(prompt, str) else [x for x in prompt if isinstance(x, str)]
        for text in texts:
            self.check_text_length(len(text), "prompt")
        if isinstance(prompt, str):
            prompts = [tok.encode(prompt)]
        elif all(isinstance(x, int) for x in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [tok.encode(x) if isinstance(x, str) else list(x) for x in prompt]
        if any(not p for p in prompts):
            raise SamplingParamsError("prompt must not be empty", "prompt")
        vocab = self.engine.model_config.vocab_size
        for p in prompts:
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:  # NOTE: before echo decodes them (huge ids overflow the decoder)
                raise SamplingParamsError(
                    f"prompt token id {bad} is out of vocabulary [0, {vocab})", "prompt"
                )
        return prompts

    def _echo_texts(self, prompt: str | list, prompts: list[list[int]]) -> list[str]:
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], str):
            return list(prompt)
        return [self.engine.tokenizer.decode(ids) for ids in prompts]

    def _prompt_outputs(
        self, req: CompletionRequest, prompts: list[list[int]], prompt_lps: dict[int, list]
    ) -> list[tuple[list[_Entry], PromptLogprobs | None]]:
        """Per prompt: its echo's legacy entries (if echo with logprobs) and vLLM's
        prompt_logprobs (if asked for)."""
        out = []
        for p, ids in enumerate(prompts):
            lps = prompt_lps.get(p)
            echoed = self._prompt_entries(ids, lps) if req.echo and req.logprobs is not None else []
            vllm = None
            if req.prompt_logprobs is not None and lps:
                vllm = vllm_prompt_logprobs(self.engine.tokenizer, lps)
            out.append((echoed, vllm))
        return out

    def _prompt_entries(self, ids: list[int], lps: list | None) -> list[_Entry]:
        """Legacy entries of an echoed prompt: the first token's logprob and top are None."""
        tok, at, out = self.engine.tokenizer, _Offset(), []
        for token_id, lp in zip(ids, lps or [None] * len(ids), strict=True):
            s = tok.id_to_token(token_id)
            if lp is None:
                out.append((s, None, None, at.offset))
            else:
                top = {tok.id_to_token(t): max(v, LOGPROB_FLOOR) for t, v in lp.top}
                top.setdefault(s, max(lp.logprob, LOGPROB_FLOOR))
                out.append((s, max(lp.logprob, LOGPROB_FLOOR), top, at.offset))
            if not tok.is_special(token_id):
                at.offset += len(at.utf8.decode(tok.token_bytes(token_id)))
        return out

    def _logprobs(self, offsets: list[_Offset], i: int, lps: list[TokenLogprob]) -> list[_Entry]:
        """Legacy entries; top_logprobs include the sampled token.

        text_offset is where each token's text starts in the choice's text: a token that holds
        part of a UTF-8 character starts at that character and advances past it only once the
        character is complete (the engine reports only tokens whose text it returned).
        """
        tok, at = self.engine.tokenizer, offsets[i]
        out = []
        for lp in lps:
            s = tok.id_to_token(lp.token_id)
            top = {tok.id_to_token(t): max(v, LOGPROB_FLOOR) for t, v in lp.top}
            top.setdefault(s, max(lp.logprob, LOGPROB_FLOOR))
            out.append((s, max(lp.logprob, LOGPROB_FLOOR), top, at.offset))
            if not tok.is_special(lp.token_id):  # NOTE: special tokens add no text (skipped)
                at.offset += len(at.utf8.decode(tok.token_bytes(lp.token_id)))
        return out
