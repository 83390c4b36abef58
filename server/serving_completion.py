"""/v1/completions: prompts → engine.generate → choices (legacy logprobs, echo), usage, chunks."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from model.inputs import TokenLogprob
from model.sampling_params import SamplingParamsError
from server.errors import APIError
from server.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
)
from server.serving_engine import OpenAIServing
from server.usage import RequestAccounting

_UTF8 = codecs.getincrementaldecoder("utf-8")


@dataclass(slots=True)
class _Choice:
    """One choice being accumulated (non-streaming) or tracked (streaming offsets, echo)."""

    text: str = ""
    offset: int = 0  # text_offset of the next token
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    num_tokens: int = 0
    started: bool = False
    # the token bytes decoded so far: text_offset advances by the characters a token completes
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: _UTF8(errors="replace"))


class OpenAIServingCompletion(OpenAIServing):
    prefix = "cmpl"

    async def create(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator | APIError:
        return await self.run(lambda: self._create(req))

    async def _create(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator:
        self.check_model(req.model)
        self.limits.check(req)
        base = self.sampling_params(req)
        prompts = await self.offload(self._prompt_ids, req.prompt)  # NOTE: tokenizing is heavy
        params = [self.fit_params(len(p), base, "prompt") for p in prompts]
        echo_texts = [""] * len(prompts)
        if req.echo:
            echo_texts = await self.offload(self._echo_texts, req.prompt, prompts)
        request_id = self.new_request_id()
        created = self.now()
        stream = self.generate(request_id, prompts, params)
        n = base.n
        choices = [_Choice() for _ in range(len(prompts) * n)]
        for i, choice in enumerate(choices):
            choice.offset = len(echo_texts[i // n])
        acct = RequestAccounting([len(p) for p in prompts])
        if req.stream:
            return self._stream(req, request_id, created, stream, choices, echo_texts, acct)
        async with aclosing(stream):
            async for p, out in stream:
                if out.error:
                    raise APIError(f"request {out.request_id} failed: {out.error}", 500)
                acct.add(p, out)
                for co in out.outputs:
                    c = choices[p * n + co.index]
                    c.text += co.text
                    c.num_tokens = co.num_tokens
                    c.finish_reason = co.finish_reason or c.finish_reason
                    if co.logprobs is not None:
                        c.logprobs = self._add_logprobs(c, co.logprobs, c.logprobs)
        num_generated = sum(c.num_tokens for c in choices)
        return CompletionResponse(
            id=request_id,
            created=created,
            model=req.model or self.model_name,
            choices=[
                CompletionChoice(
                    index=i,
                    text=echo_texts[i // n] + c.text,
                    logprobs=c.logprobs if req.logprobs is not None else None,
                    finish_reason=c.finish_reason,
                )
                for i, c in enumerate(choices)
            ],
            usage=acct.usage(num_generated),
            timings=acct.timings(num_generated) if req.timings_per_token else None,
        )

    async def _stream(self, req, request_id, created, stream, choices, echo_texts, acct):
        """One chunk per changed choice; the usage chunk (choices: []) last if asked."""
        n = len(choices) // len(echo_texts)
        async with aclosing(stream):
            async for p, out in stream:
                if out.error:
                    raise APIError(f"request {out.request_id} failed: {out.error}", 500)
                acct.add(p, out)
                for co in out.outputs:
                    index = p * n + co.index
                    c = choices[index]
                    c.num_tokens = co.num_tokens
                    text = co.text
                    if not c.started:
                        c.started = True
                        text = echo_texts[p] + text
                    logprobs = None
                    if co.logprobs is not None:
                        logprobs = self._add_logprobs(c, co.logprobs, None)
                    if not text and co.finish_reason is None and logprobs is None:
                        continue
                    choice = CompletionChoice(
                        index=index, text=text, logprobs=logprobs, finish_reason=co.finish_reason
                    )
                    timings = None
                    if req.timings_per_token:
                        timings = acct.timings(sum(c.num_tokens for c in choices))
                    yield CompletionResponse(
                        id=request_id,
                        created=created,
                        model=req.model or self.model_name,
                        choices=[choice],
                        timings=timings,
                    )
        if req.include_usage:
            num_generated = sum(c.num_tokens for c in choices)
            yield CompletionResponse(
                id=request_id,
                created=created,
                model=req.model or self.model_name,
                choices=[],
                usage=acct.usage(num_generated),
                timings=acct.timings(num_generated) if req.timings_per_token else None,
            )

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

    def _add_logprobs(
        self, c: _Choice, lps: list[TokenLogprob], into: CompletionLogProbs | None
    ) -> CompletionLogProbs:
        """Legacy shape: tokens, token_logprobs, top_logprobs (dicts incl. the sampled token).

        text_offset is where each token's text starts in the choice's text: a token that holds
        part of a UTF-8 character starts at that character and advances past it only once the
        character is complete (the engine reports only tokens whose text it returned).
        """
        tok = self.engine.tokenizer
        into = into or CompletionLogProbs()
        for lp in lps:
            s = tok.id_to_token(lp.token_id)
            top = {tok.id_to_token(t): max(v, -9999.0) for t, v in lp.top}
            top.setdefault(s, max(lp.logprob, -9999.0))
            into.tokens.append(s)
            into.token_logprobs.append(max(lp.logprob, -9999.0))
            into.top_logprobs.append(top)
            into.text_offset.append(c.offset)
            if not tok.is_special(lp.token_id):  # NOTE: special tokens add no text (skipped)
                c.offset += len(c.utf8.decode(tok.token_bytes(lp.token_id)))
        return into
