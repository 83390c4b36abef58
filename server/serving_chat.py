"""/v1/chat/completions: chat template → engine → choices, or role-first deltas + usage chunk."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from scheduler import TokenLogprob
from server.accumulator import LOGPROB_FLOOR
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
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCallMessage,
    TopLogprob,
)
from server.serving_engine import (
    OpenAIServing,
    capture_prompt_logprobs,
    vllm_prompt_logprobs,
)
from server.tool_calls import (
    CALL_CLOSE,
    CALL_OPEN,
    ToolCallDelta,
    ToolCallStreamer,
    parse_tool_calls,
    preamble,
    tool_call_constraint,
)

if TYPE_CHECKING:
    from scheduler.outputs import CompletionOutput


class OpenAIServingChat(OpenAIServing):
    prefix = "chatcmpl"

    def _tag_ids(self) -> tuple[int | None, int | None]:
        """The call tags' token ids where the tokenizer has each as one special token."""
        tok = self.engine.tokenizer

        def one(text: str) -> int | None:
            ids = tok.encode(text, add_special_tokens=False)
            return ids[0] if len(ids) == 1 and tok.is_special(ids[0]) else None

        return one(CALL_OPEN), one(CALL_CLOSE)

    def render(
        self, req_messages: list, add_generation_prompt: bool = True, req: Any = None
    ) -> list[int]:
        """Chat template → token ids; tools via the template or the built-in preamble; 400s."""
        messages = [m.to_template() for m in req_messages]
        self.check_text_length(sum(len(m["content"]) for m in messages), "messages")
        tok, template = self.engine.tokenizer, self.config.chat_template
        kwargs: dict[str, Any] = dict((req.chat_template_kwargs or {}) if req else {})
        tools = None
        if req is not None and req.tool_mode != "none":
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            if not tok.template_takes("tools", template):
                messages = _with_preamble(messages, preamble(tools))
                tools = None
        if not tok.template_takes("tool_calls", template):
            messages = [_calls_as_text(m) for m in messages]
        continue_final = bool(req and req.continue_final_message)
        try:
            return list(
                tok.apply_chat_template(
                    messages,
                    add_generation_prompt,
                    tools=tools,
                    chat_template=template,
                    continue_final_message=continue_final,
                    **kwargs,
                )
            )
        except ValueError as e:
            param = "chat_template_kwargs" if kwargs else "messages"
            raise APIError(f"cannot apply the chat template: {e}", 400, param=param) from e

    async def _create(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator:
        params = self.sampling_params(req)
        mode = req.tool_mode
        if mode in ("required", "named") and params.structured_outputs is not None:
            raise APIError(
                f"tool_choice {mode!r} cannot be combined with {params.structured_outputs.param}",
                400,
                param="tool_choice",
            )
        if mode != "none" and params.structured_outputs is None:
            # NOTE: auto with response_format keeps the user's constraint: no call grammar
            name = req.tool_choice.function.name if mode == "named" else None
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            constraint = tool_call_constraint(
                tools, name, req.parallel_tool_calls, auto=mode == "auto", tag_ids=self._tag_ids()
            )
            params = replace(params, structured_outputs=constraint)
        # NOTE: templating is heavy: off the event loop
        prompt = await self.offload(self.render, req.messages, req.add_generation_prompt, req)
        params = self.fit_params(len(prompt), params, "messages")
        head, acc, stream = self.start(req, [prompt], [params], self._logprobs)
        if req.stream:
            role = DeltaMessage(role="assistant", content="")
            first = [ChatStreamChoice(index=i, delta=role) for i in range(params.n)]
            choices = self._chunk_choices(req, params.n)
            return self.chunks(req, head, acc, stream, ChatCompletionChunk, choices, first)
        prompt_lps: dict[int, list] = {}
        await acc.drain(capture_prompt_logprobs(stream, prompt_lps))
        choices = []
        for i, c in enumerate(acc.choices):
            message, finish = ChatResponseMessage(content=c.text), c.finish_reason
            if mode != "none":
                content, calls = parse_tool_calls(c.text)  # the stream's parser: same calls
                if calls:
                    message = ChatResponseMessage(content=content, tool_calls=_response(calls))
                    finish = "tool_calls" if finish == "stop" else finish
            logprobs = ChatLogprobs(content=c.logprobs) if req.logprobs else None
            choices.append(
                ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=finish)
            )
        vllm = None
        if prompt_lps.get(0):  # NOTE: many token texts for a long prompt: off the event loop
            vllm = await self.offload(vllm_prompt_logprobs, self.engine.tokenizer, prompt_lps[0])
        return ChatCompletionResponse(
            **head,
            choices=choices,
            usage=acc.usage(),
            timings=acc.timings(),
            prompt_logprobs=vllm,
        )

    def _chunk_choices(self, req: ChatCompletionRequest, n: int) -> Callable:
        """Content deltas, or with tools each call's deltas as the parser finds them; then the
        finish reason (tool_calls when calls were made) and logprobs in a choice of their own."""
        parsers = [ToolCallStreamer() for _ in range(n)] if req.tool_mode != "none" else None

        def choices(i: int, co: CompletionOutput, entries: list | None) -> list[ChatStreamChoice]:
            lps = ChatLogprobs(content=entries) if entries is not None else None
            finish, out = co.finish_reason, []
            if parsers is None:
                if not co.text and finish is None and lps is None:
                    return []
                delta = DeltaMessage(content=co.text or None)
            else:
                events = parsers[i].feed(co.text)
                if finish is not None:
                    events += parsers[i].flush()
                out = [ChatStreamChoice(index=i, delta=d) for d in _tool_deltas(events)]
                if finish == "stop" and parsers[i].num_calls:
                    finish = "tool_calls"
                if finish is None and lps is None:
                    return out
                delta = DeltaMessage()
            return [
                *out,
                ChatStreamChoice(index=i, delta=delta, logprobs=lps, finish_reason=finish),
            ]

        return choices

    def _logprobs(self, _: int, lps: list[TokenLogprob]) -> list[ChatTokenLogprob]:
        """New shape: token, logprob, bytes, top_logprobs (one choice per request: no index)."""
        tok = self.engine.tokenizer

        def entry(token_id: int, logprob: float, cls: type = TopLogprob, **top: Any) -> Any:
            logprob = max(logprob, LOGPROB_FLOOR)
            raw = list(tok.token_bytes(token_id))
            return cls(token=tok.id_to_token(token_id), logprob=logprob, bytes=raw, **top)

        return [
            entry(
                lp.token_id, lp.logprob, ChatTokenLogprob, top_logprobs=[entry(*t) for t in lp.top]
            )
            for lp in lps
        ]


def _response(calls: list[ToolCallDelta]) -> list[ToolCallMessage]:
    return [
        ToolCallMessage(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]


def _tool_deltas(events: list[str | ToolCallDelta]) -> list[DeltaMessage]:
    """Content as it comes; each call as OpenAI streams it: index, id and name, then arguments."""
    out = []
    for ev in events:
        if isinstance(ev, str):
            out.append(DeltaMessage(content=ev))
            continue
        kind = "function" if ev.id is not None else None
        fn = DeltaFunction(name=ev.name, arguments=ev.arguments)
        call = DeltaToolCall(index=ev.index, id=ev.id, type=kind, function=fn)
        out.append(DeltaMessage(tool_calls=[call]))
    return out


def _with_preamble(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Put the tool preamble into the system message (a new one if there is none)."""
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{text}".strip())
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """For templates that know no tool_calls: an assistant's calls written as the model would."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    lines = [message["content"]] if message["content"] else []
    for c in calls:
        body = {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        lines.append(f"{CALL_OPEN}{json.dumps(body)}{CALL_CLOSE}")
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    out["content"] = "\n".join(lines)
    return out
