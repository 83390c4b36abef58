"""/v1/chat/completions: chat template → engine → choices, or role-first deltas + usage chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from model.inputs import TokenLogprob
from server.errors import APIError
from server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
)
from server.serving_engine import OpenAIServing
from server.usage import RequestAccounting


class OpenAIServingChat(OpenAIServing):
    prefix = "chatcmpl"

    async def create(
        self, req: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator | APIError:
        return await self.run(lambda: self._create(req))

    def render(self, req_messages: list, add_generation_prompt: bool = True) -> list[int]:
        """Chat template → token ids; a model without a template is a 400."""
        messages = [m.to_template() for m in req_messages]
        self.check_text_length(sum(len(m["content"]) for m in messages), "messages")
        try:
            return list(self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt))
        except ValueError as e:
            raise APIError(f"cannot apply the chat template: {e}", 400, param="messages") from e

    async def _create(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator:
        self.check_model(req.model)
        self.limits.check(req)
        params = self.sampling_params(req)
        prompt = await self.offload(self.render, req.messages)  # NOTE: templating is heavy
        params = self.fit_params(len(prompt), params, "messages")
        request_id = self.new_request_id()
        created = self.now()
        stream = self.generate(request_id, [prompt], [params])
        acct = RequestAccounting([len(prompt)])
        if req.stream:
            return self._stream(req, request_id, created, stream, params.n, acct)
        texts = [""] * params.n
        logprobs: list[list[ChatTokenLogprob] | None] = [None] * params.n
        finish: list[str | None] = [None] * params.n
        counts = [0] * params.n
        async with aclosing(stream):
            async for _, out in stream:
                if out.error:
                    raise APIError(f"request {out.request_id} failed: {out.error}", 500)
                acct.add(0, out)
                for co in out.outputs:
                    texts[co.index] += co.text
                    counts[co.index] = co.num_tokens
                    finish[co.index] = co.finish_reason or finish[co.index]
                    if co.logprobs is not None:
                        logprobs[co.index] = (logprobs[co.index] or []) + self._logprobs(
                            co.logprobs
                        )
        choices = [
            ChatChoice(
                index=i,
                message=ChatResponseMessage(content=texts[i]),
                logprobs=ChatLogprobs(content=logprobs[i] or []) if req.logprobs else None,
                finish_reason=finish[i],
            )
            for i in range(params.n)
        ]
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=req.model or self.model_name,
            choices=choices,
            usage=acct.usage(sum(counts)),
            timings=acct.timings(sum(counts)) if req.timings_per_token else None,
        )

    async def _stream(self, req, request_id, created, stream, n, acct):
        """First chunk per choice carries role: assistant; then content deltas; usage chunk last."""

        def chunk(choices: list[ChatStreamChoice], usage: bool = False):
            return ChatCompletionChunk(
                id=request_id,
                created=created,
                model=req.model or self.model_name,
                choices=choices,
                usage=acct.usage(sum(counts)) if usage else None,
                timings=acct.timings(sum(counts)) if req.timings_per_token else None,
            )

        counts = [0] * n
        async with aclosing(stream):
            for i in range(n):
                role = DeltaMessage(role="assistant", content="")
                yield chunk([ChatStreamChoice(index=i, delta=role)])
            async for _, out in stream:
                if out.error:
                    raise APIError(f"request {out.request_id} failed: {out.error}", 500)
                acct.add(0, out)
                for co in out.outputs:
                    counts[co.index] = co.num_tokens
                    lps = None
                    if co.logprobs is not None and req.logprobs:
                        lps = ChatLogprobs(content=self._logprobs(co.logprobs))
                    if not co.text and co.finish_reason is None and lps is None:
                        continue
                    delta = DeltaMessage(content=co.text or None)
                    choice = ChatStreamChoice(
                        index=co.index, delta=delta, logprobs=lps, finish_reason=co.finish_reason
                    )
                    yield chunk([choice])
        if req.include_usage:
            yield chunk([], usage=True)

    def _logprobs(self, lps: list[TokenLogprob]) -> list[ChatTokenLogprob]:
        """New shape: token, logprob, bytes, top_logprobs."""
        tok = self.engine.tokenizer

        def top(token_id: int, logprob: float) -> TopLogprob:
            s, raw = tok.id_to_token(token_id), tok.token_bytes(token_id)
            return TopLogprob(token=s, logprob=max(logprob, -9999.0), bytes=list(raw))

        out = []
        for lp in lps:
            head = top(lp.token_id, lp.logprob)
            out.append(
                ChatTokenLogprob(
                    token=head.token,
                    logprob=head.logprob,
                    bytes=head.bytes,
                    top_logprobs=[top(t, v) for t, v in lp.top],
                )
            )
        return out
