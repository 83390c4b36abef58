"""/v1/chat/completions: chat template → engine → choices, or role-first deltas + usage chunk."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from scheduler import SamplingParams, TokenLogprob
from server.accumulator import LOGPROB_FLOOR
from server.constraints import functions, tool_call_constraint
from server.errors import APIError
from server.protocol.chat import (
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
from server.reasoning import REASONING_PARSERS, ReasoningParser, ReasoningStreamer
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
)
from server.tool_parsers import TOOL_PARSERS, ToolParser

if TYPE_CHECKING:
    from scheduler.async_engine import AsyncEngine
    from scheduler.outputs import CompletionOutput
    from server.config import ServerConfig
    from server.offload import Offload

PROMPT_TAIL_TOKENS = 16  # the prompt's last tokens, read for a reasoning tag its template wrote


class OpenAIServingChat(OpenAIServing):
    prefix = "chatcmpl"

    def __init__(self, engine: AsyncEngine, config: ServerConfig, offload: Offload) -> None:
        super().__init__(engine, config, offload)
        name = config.reasoning_parser
        self.reasoning: ReasoningParser | None = REASONING_PARSERS[name]() if name else None

    def _special_ids(self, *texts: str) -> dict[str, int | None]:
        """Each tag's token id where the tokenizer has it as one special token."""
        tok = self.engine.tokenizer

        def one(text: str) -> int | None:
            ids = tok.encode(text, add_special_tokens=False)
            return ids[0] if len(ids) == 1 and tok.is_special(ids[0]) else None

        return {t: one(t) for t in texts}

    def _tag_ids(self) -> tuple[int | None, int | None]:
        ids = self._special_ids(CALL_OPEN, CALL_CLOSE)
        return ids[CALL_OPEN], ids[CALL_CLOSE]

    def _tool_parser(self, req: ChatCompletionRequest) -> ToolParser | None:
        """The --tool-call-parser for this request's tools (None: tokenmill's own format)."""
        name = self.config.tool_call_parser
        if name is None or req.tool_mode == "none":
            return None
        return TOOL_PARSERS[name]([t.model_dump(exclude_none=True) for t in req.tools])

    def render(
        self, req_messages: list, add_generation_prompt: bool = True, req: Any = None
    ) -> list[int]:
        """Chat template → token ids; tools via the template or the built-in preamble; 400s."""
        messages = [m.to_template() for m in req_messages]
        self.check_text_length(sum(len(m["content"]) for m in messages), "messages")
        tok, template = self.engine.tokenizer, self.config.chat_template
        kwargs: dict[str, Any] = dict((req.chat_template_kwargs or {}) if req else {})
        tools, native = None, self.config.tool_call_parser
        if req is not None and req.tool_mode != "none":
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            # NOTE: the preamble teaches tokenmill's own format, which is hermes'
            if native in (None, "hermes") and not tok.template_takes("tools", template):
                messages = _with_preamble(messages, preamble(tools))
                tools = None
        if not tok.template_takes("tool_calls", template):
            write = TOOL_PARSERS[native]().format_calls if native else _hermes_calls
            messages = [_calls_as_text(m, write) for m in messages]
        continue_final = bool(req and req.continue_final_message)

        def apply(msgs: list[dict[str, Any]]) -> list[int]:
            return list(
                tok.apply_chat_template(
                    msgs,
                    add_generation_prompt,
                    tools=tools,
                    chat_template=template,
                    continue_final_message=continue_final,
                    **kwargs,
                )
            )

        try:
            return apply(messages)
        except ValueError as e:
            texts = [_arguments_as_text(m) for m in messages]
            if texts != messages:  # NOTE: DeepSeek's templates join `arguments` as a string
                try:
                    return apply(texts)
                except ValueError:
                    pass
            param = "chat_template_kwargs" if kwargs else "messages"
            raise APIError(f"cannot apply the chat template: {e}", 400, param=param) from e

    async def _create(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator:
        params = self.sampling_params(req)
        mode, parser = req.tool_mode, self._tool_parser(req)
        if mode == "auto" and parser is not None and not self.config.enable_auto_tool_choice:
            raise APIError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set",
                400,
                param="tool_choice",
            )
        params = self._tool_params(req, params, parser)
        # NOTE: templating is heavy: off the event loop
        prompt = await self.offload(self.render, req.messages, req.add_generation_prompt, req)
        params, in_reasoning = self._reasoning_params(req, prompt, params)
        params = self.fit_params(len(prompt), params, "messages")
        head, acc, stream = await self.start(req, [prompt], [params], self._logprobs)
        if req.stream:
            role = DeltaMessage(role="assistant", content="")
            first = [ChatStreamChoice(index=i, delta=role) for i in range(params.n)]
            choices = self._chunk_choices(req, params.n, parser, in_reasoning)
            return self.chunks(req, head, acc, stream, ChatCompletionChunk, choices, first)
        prompt_lps: dict[int, list] = {}
        await acc.drain(capture_prompt_logprobs(stream, prompt_lps))
        choices = []
        for i, c in enumerate(acc.choices):
            message, finish = self._message(c.text, mode, parser, in_reasoning), c.finish_reason
            if message.tool_calls and finish == "stop":
                finish = "tool_calls"
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

    def _tool_params(
        self, req: ChatCompletionRequest, params: SamplingParams, parser: ToolParser | None
    ) -> SamplingParams:
        """The call grammar (tokenmill's format, or the parser's), unless the request has a
        constraint already; special tokens kept where the parser's tags are special."""
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
            if parser is None:
                tools = [t.model_dump(exclude_none=True) for t in req.tools]
                constraint = tool_call_constraint(
                    tools, name, req.parallel_tool_calls, mode == "auto", self._tag_ids()
                )
            else:
                functions(parser.tools, name)  # an unknown name is a 400 before anything runs
                ids = self._special_ids(*parser.tags)
                constraint = parser.constraint(name, req.parallel_tool_calls, mode == "auto", ids)
            params = replace(params, structured_outputs=constraint)
        if parser is not None and parser.keep_special_tokens:
            params = replace(params, skip_special_tokens=False)  # its tags are special tokens
        return params

    def _reasoning_params(
        self, req: ChatCompletionRequest, prompt: list[int], params: SamplingParams
    ) -> tuple[SamplingParams, bool | None]:
        """Where the reply starts (the prompt's tail: in a reasoning block, after one, or
        either), and the constraint moved behind the reasoning."""
        r = self.reasoning
        if r is None:
            return params, None
        if r.keep_special_tokens:
            params = replace(params, skip_special_tokens=False)  # its tags are special tokens
        continued = None
        if req.continue_final_message:
            continued = req.messages[-1].to_template()["content"]
        tail = self.engine.tokenizer.decode(prompt[-PROMPT_TAIL_TOKENS:], False)
        in_reasoning = r.starts_in_reasoning(tail, continued)
        if params.structured_outputs is not None:
            ids = self._special_ids(r.start_tag, r.end_tag)
            constraint = r.constraint(
                params.structured_outputs, in_reasoning, (ids[r.start_tag], ids[r.end_tag])
            )
            params = replace(params, structured_outputs=constraint)
        return params, in_reasoning

    def _message(
        self, text: str, mode: str, parser: ToolParser | None, in_reasoning: bool | None
    ) -> ChatResponseMessage:
        """A whole reply: reasoning split off first, then calls parsed out of the content."""
        reasoning, content = None, text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.parse(text, in_reasoning)
        if mode != "none" and content:
            # the stream's parser: the same calls
            rest, calls = parser.parse(content) if parser else parse_tool_calls(content)
            if calls:
                return ChatResponseMessage(
                    content=rest,
                    reasoning=reasoning,
                    reasoning_content=reasoning,
                    tool_calls=_response(calls),
                )
        return ChatResponseMessage(
            content=content, reasoning=reasoning, reasoning_content=reasoning
        )

    def _chunk_choices(
        self,
        req: ChatCompletionRequest,
        n: int,
        parser: ToolParser | None,
        in_reasoning: bool | None,
    ) -> Callable:
        """Reasoning deltas (with a reasoning parser), content deltas, or with tools each call's
        deltas as the parser finds them; then the finish reason (tool_calls when calls were
        made) and logprobs in a choice of their own."""
        parsers = None
        if req.tool_mode != "none":
            parsers = [parser.streamer() if parser else ToolCallStreamer() for _ in range(n)]
        thinking: list[ReasoningStreamer] | None = None
        if self.reasoning is not None:
            thinking = [self.reasoning.streamer(in_reasoning) for _ in range(n)]

        def choices(i: int, co: CompletionOutput, entries: list | None) -> list[ChatStreamChoice]:
            lps = ChatLogprobs(content=entries) if entries is not None else None
            finish, out, text = co.finish_reason, [], co.text
            if thinking is not None:
                d = thinking[i].feed(text)
                if finish is not None:
                    end = thinking[i].flush()
                    d.reasoning, d.content = d.reasoning + end.reasoning, d.content + end.content
                text = d.content
                if d.reasoning:
                    delta = DeltaMessage(reasoning=d.reasoning, reasoning_content=d.reasoning)
                    out.append(ChatStreamChoice(index=i, delta=delta))
            if parsers is None:
                if text or finish is not None or lps is not None:
                    delta = DeltaMessage(content=text or None)
                    out.append(
                        ChatStreamChoice(index=i, delta=delta, logprobs=lps, finish_reason=finish)
                    )
                return out
            events = parsers[i].feed(text)
            if finish is not None:
                events += parsers[i].flush()
            out += [ChatStreamChoice(index=i, delta=d) for d in _tool_deltas(events)]
            if finish == "stop" and parsers[i].num_calls:
                finish = "tool_calls"
            if finish is None and lps is None:
                return out
            last = ChatStreamChoice(
                index=i, delta=DeltaMessage(), logprobs=lps, finish_reason=finish
            )
            return [*out, last]

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


def _hermes_calls(calls: list[dict[str, Any]]) -> str:
    """Calls in tokenmill's own format (its preamble's), one per line."""
    bodies = [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls
    ]
    return "\n".join(f"{CALL_OPEN}{json.dumps(b)}{CALL_CLOSE}" for b in bodies)


def _arguments_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant's calls with their arguments as JSON text, for templates that want text."""
    calls = message.get("tool_calls")
    if not calls or all(isinstance(c["function"]["arguments"], str) for c in calls):
        return message

    def text(args: Any) -> str:
        return args if isinstance(args, str) else json.dumps(args)

    out = [{**c, "function": {**c["function"], "arguments": text(c["function"]["arguments"])}}
           for c in calls]  # fmt: skip
    return {**message, "tool_calls": out}


def _calls_as_text(message: dict[str, Any], write: Callable[[list], str]) -> dict[str, Any]:
    """For templates that know no tool_calls: an assistant's calls written as the model would."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    lines = [message["content"]] if message["content"] else []
    lines.append(write(calls))
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    out["content"] = "\n".join(lines)
    return out
