"""/v1/messages (Anthropic's Messages API) translated onto the chat path: one chat request, the
same template, tool grammar and engine; its answer or chunks back into Anthropic's shapes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from pydantic import ValidationError

from server.errors import APIError, anthropic_error_body
from server.protocol.anthropic import (
    AnthropicCountTokensRequest,
    AnthropicCountTokensResponse,
    AnthropicMessagesRequest,
    AnthropicResponse,
    AnthropicUsage,
    _AnthropicPrompt,
)
from server.protocol.chat import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from server.serving_chat import OpenAIServingChat
from server.serving_engine import check_model_name
from server.sse import EventStream

STOP_REASONS = {"tool_calls": "tool_use", "length": "max_tokens"}  # else end_turn
# vLLM's sampling extras a client may add (extra_body) to the Anthropic and Responses APIs
VLLM_EXTRAS = ("top_k", "min_p", "repetition_penalty", "seed", "ignore_eos", "min_tokens",
               "presence_penalty", "frequency_penalty", "logit_bias")  # fmt: skip


def vllm_extras(req: Any) -> dict[str, Any]:
    """The VLLM_EXTRAS a request carries, for its chat request (which checks them)."""
    extra = req.model_extra or {}
    return {k: extra[k] for k in VLLM_EXTRAS if k in extra}


def _messages(req: _AnthropicPrompt, reasoning: bool) -> list[dict[str, Any]]:
    """Anthropic turns → chat messages: tool_result blocks become tool messages (ahead of the
    turn's text, as Anthropic orders them), tool_use blocks an assistant's tool_calls, and with
    `reasoning` (a reasoning parser is set) thinking blocks its reasoning_content."""
    out: list[dict[str, Any]] = []
    if req.system_text:
        out.append({"role": "system", "content": req.system_text})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts = [b.text for b in m.content if b.type == "text"]
        uses = [b for b in m.content if b.type == "tool_use"]
        results = [b for b in m.content if b.type == "tool_result"]
        wrong = "tool_result" if m.role == "assistant" and results else None
        wrong = "tool_use" if m.role == "user" and uses else wrong
        if wrong:
            raise APIError(f"messages.{i}: a {m.role} message cannot hold {wrong} blocks", 400)
        for r in results:
            out.append({"role": "tool", "tool_call_id": r.tool_use_id, "content": r.text})
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
            thoughts = [b.thinking for b in m.content if b.type == "thinking" and b.thinking]
            if reasoning and thoughts:
                msg["reasoning_content"] = "\n".join(thoughts)
            if uses:
                msg["tool_calls"] = [
                    {"id": u.id, "type": "function",
                     "function": {"name": u.name, "arguments": json.dumps(u.input)}}
                    for u in uses
                ]  # fmt: skip
            out.append(msg)
        elif texts or not results:
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def to_chat(req: _AnthropicPrompt, reasoning: bool = False) -> ChatCompletionRequest:
    """The chat request that generates this Anthropic request's answer; `reasoning`: a
    reasoning parser is set (earlier thinking blocks go back to the template)."""
    body: dict[str, Any] = {"model": req.model, "messages": _messages(req, reasoning)}
    if req.thinking is not None and req.thinking.type != "adaptive":
        body["chat_template_kwargs"] = {"enable_thinking": req.thinking.type == "enabled"}
    last = req.messages[-1] if req.messages else None
    if last is not None and last.role == "assistant" and body["messages"][-1].get("content"):
        if "tool_calls" not in body["messages"][-1]:
            # NOTE: Anthropic's prefill: a final assistant turn is continued, not closed
            body.update(continue_final_message=True, add_generation_prompt=False)
    choice = req.tool_choice
    if choice is not None and choice.type in ("any", "tool") and not req.tools:
        raise APIError(f"tool_choice type {choice.type!r} needs tools", 400)
    if req.tools and (choice is None or choice.type != "none"):
        body["tools"] = [
            {"type": "function", "function": {"name": t.name, "parameters": t.input_schema,
                                              **({"description": t.description}
                                                 if t.description else {})}}
            for t in req.tools
        ]  # fmt: skip
        if choice is not None:
            if choice.type == "tool" and not choice.name:
                raise APIError("tool_choice type 'tool' needs a name", 400)
            named = {"type": "function", "function": {"name": choice.name}}
            body["tool_choice"] = {"auto": "auto", "any": "required", "tool": named}[choice.type]
            body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    if isinstance(req, AnthropicMessagesRequest):
        body.update(vllm_extras(req))
        body["max_tokens"] = req.max_tokens
        for field in ("temperature", "top_p", "top_k"):
            if getattr(req, field) is not None:
                body[field] = getattr(req, field)
        if req.stop_sequences:
            # NOTE: kept in the text so that the one that matched can be named (stop_sequence),
            # then cut off here
            body["stop"] = req.stop_sequences
            body["include_stop_str_in_output"] = True
        user = (req.metadata or {}).get("user_id")
        if isinstance(user, str):
            body["user"] = user
        if req.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise APIError(f"{where}: {first.get('msg')}", 400) from e


def _cut_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """The text without the stop sequence that ended it, and that sequence (None: none did)."""
    for s in sorted(stops, key=len, reverse=True):
        if s and text.endswith(s):
            return text[: -len(s)], s
    return text, None


def _thinking(text: str) -> dict[str, Any]:
    """A thinking block; its signature is empty (Anthropic's verifies Claude wrote it)."""
    return {"type": "thinking", "thinking": text, "signature": ""}


def _usage(prompt: int, cached: int, output: int) -> AnthropicUsage:
    return AnthropicUsage(
        input_tokens=prompt - cached, output_tokens=output, cache_read_input_tokens=cached
    )


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the object Anthropic sends; cut-off JSON (max_tokens) gives {}."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class ServingMessages:
    """Anthropic's Messages API over the chat endpoint (no second generation path)."""

    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat

    async def create(self, req: AnthropicMessagesRequest) -> Any:
        """The three-way return: AnthropicResponse, an EventStream, or an APIError."""
        try:
            chat_req = to_chat(req, self.chat.reasoning is not None)
            num_prompt = 0
            if req.stream:
                # NOTE: message_start carries the prompt's tokens (clients track the context by
                # it), and the chat stream tells them only at its end: rendered twice
                num_prompt = len(await self._render(chat_req))
        except APIError as e:
            return e
        result = await self.chat.create(chat_req)
        if isinstance(result, APIError):
            return result
        msg_id = f"msg_{uuid.uuid4().hex[:24]}"
        model = req.model
        stops = req.stop_sequences or []
        if isinstance(result, ChatCompletionResponse):
            return _response(msg_id, model, result, stops)
        return EventStream(_events(msg_id, model, result, stops, num_prompt), _error_event)

    async def _render(self, chat_req: ChatCompletionRequest) -> list[int]:
        check_model_name(chat_req.model, self.chat.model_names)
        render, messages = self.chat.render, chat_req.messages
        return await self.chat.offload(render, messages, chat_req.add_generation_prompt, chat_req)

    async def count_tokens(self, req: AnthropicCountTokensRequest) -> Any:
        """The prompt's tokens as /v1/messages would render it (tools included)."""
        try:
            prompt = await self._render(to_chat(req, self.chat.reasoning is not None))
        except APIError as e:
            return e
        return AnthropicCountTokensResponse(input_tokens=len(prompt))


def _error_event(err: APIError) -> tuple[str, dict]:
    return "error", anthropic_error_body(err.message, err.status_code)


def _response(
    msg_id: str, model: str, resp: ChatCompletionResponse, stops: list[str]
) -> AnthropicResponse:
    choice = resp.choices[0]
    text, thinking = choice.message.content or "", choice.message.reasoning or ""
    stop_sequence = None
    if stops and choice.finish_reason == "stop":
        # NOTE: a stop sequence inside the reasoning ends it: then there is no text to cut
        if text:
            text, stop_sequence = _cut_stop(text, stops)
        else:
            thinking, stop_sequence = _cut_stop(thinking, stops)
    content: list[dict[str, Any]] = [_thinking(thinking)] if thinking else []
    if text:
        content.append({"type": "text", "text": text})
    for call in choice.message.tool_calls or []:
        content.append(
            {"type": "tool_use", "id": call.id.replace("call_", "toolu_", 1),
             "name": call.function.name, "input": _tool_input(call.function.arguments)}
        )  # fmt: skip
    reason = STOP_REASONS.get(choice.finish_reason or "", "end_turn")
    details = resp.usage.prompt_tokens_details
    cached = details.cached_tokens if details else 0
    return AnthropicResponse(
        id=msg_id,
        model=model,
        content=content,
        stop_reason="stop_sequence" if stop_sequence else reason,
        stop_sequence=stop_sequence,
        usage=_usage(resp.usage.prompt_tokens, cached, resp.usage.completion_tokens),
    )


class _Blocks:
    """The content blocks of one streamed message: which is open, its events, and the text held
    back while it may still end in a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.index = -1
        self.open: str | None = None  # "thinking" | "text" | "tool_use"
        self.stops = stops
        self.longest = max(map(len, stops), default=0)
        self.held, self.held_kind = "", "text"

    def stop(self) -> list[tuple[str, dict]]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":  # NOTE: Anthropic sends the signature just before the stop
            events.append(self._delta({"type": "signature_delta", "signature": ""}))
        self.open = None
        events.append(("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        return events

    def start(self, block: dict[str, Any]) -> list[tuple[str, dict]]:
        events = self.stop()
        self.index += 1
        self.open = block["type"]
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        return [*events, ("content_block_start", start)]

    def _delta(self, delta: dict[str, Any]) -> tuple[str, dict]:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index,
                                       "delta": delta}  # fmt: skip

    def _write(self, kind: str, text: str) -> list[tuple[str, dict]]:
        """`text` into a `kind` block (thinking or text), opening one if another is open."""
        if not text:
            return []
        block = _thinking("") if kind == "thinking" else {"type": "text", "text": ""}
        events = self.start(block) if self.open != kind else []
        if kind == "thinking":
            return [*events, self._delta({"type": "thinking_delta", "thinking": text})]
        return [*events, self._delta({"type": "text_delta", "text": text})]

    def feed(self, kind: str, text: str | None) -> list[tuple[str, dict]]:
        """Thinking or text as it comes, less the tail that may be a stop sequence's start."""
        if not text:
            return []
        events = self.release() if kind != self.held_kind else []
        self.held_kind, self.held = kind, self.held + text
        cut = max(len(self.held) - self.longest, 0)
        events += self._write(kind, self.held[:cut])
        self.held = self.held[cut:]
        return events

    def release(self) -> list[tuple[str, dict]]:
        """The held text, written out: a tool call or the other kind of text follows."""
        text, self.held = self.held, ""
        return self._write(self.held_kind, text)

    def json(self, partial: str) -> tuple[str, dict]:
        return self._delta({"type": "input_json_delta", "partial_json": partial})

    def end(self, finish: str | None) -> tuple[list[tuple[str, dict]], str | None]:
        """The last events (held text less the stop sequence that ended it, the last stop) and
        that sequence (None: none did)."""
        stop_sequence = None
        if self.stops and finish == "stop":
            self.held, stop_sequence = _cut_stop(self.held, self.stops)
        return [*self.release(), *self.stop()], stop_sequence


async def _events(
    msg_id: str,
    model: str,
    chunks: AsyncIterator[ChatCompletionChunk],
    stops: list[str],
    num_prompt: int,
) -> AsyncIterator[tuple[str, dict]]:
    """Chat chunks → message_start, ping, content blocks (thinking_delta + signature_delta,
    text_delta, input_json_delta), message_delta (stop_reason, usage), message_stop. NOTE:
    prefix-cache hits are known only at the end: message_start counts every prompt token as
    input, message_delta splits them."""
    start = AnthropicResponse(
        id=msg_id, model=model, content=[], stop_reason=None, usage=_usage(num_prompt, 0, 0)
    )
    yield "message_start", {"type": "message_start", "message": start.model_dump()}
    yield "ping", {"type": "ping"}
    blocks, finish, usage = _Blocks(stops), None, None
    async with aclosing(chunks):
        async for chunk in chunks:
            if chunk.usage is not None and not chunk.choices:
                usage = chunk.usage
            for c in chunk.choices:
                events = blocks.feed("thinking", c.delta.reasoning)
                events += blocks.feed("text", c.delta.content)
                for call in c.delta.tool_calls or []:
                    if call.id is not None:
                        tool_id = call.id.replace("call_", "toolu_", 1)
                        block = {"type": "tool_use", "id": tool_id, "name": call.function.name,
                                 "input": {}}  # fmt: skip
                        events += [*blocks.release(), *blocks.start(block)]
                    if call.function.arguments:
                        events.append(blocks.json(call.function.arguments))
                for event in events:
                    yield event
                finish = c.finish_reason or finish
    events, stop_sequence = blocks.end(finish)
    for event in events:
        yield event
    reason = "stop_sequence" if stop_sequence else STOP_REASONS.get(finish or "", "end_turn")
    prompt = usage.prompt_tokens if usage else 0
    details = usage.prompt_tokens_details if usage else None
    cached = details.cached_tokens if details else 0
    u = _usage(prompt, cached, usage.completion_tokens if usage else 0).model_dump()
    delta = {"stop_reason": reason, "stop_sequence": stop_sequence}
    yield "message_delta", {"type": "message_delta", "delta": delta, "usage": u}
    yield "message_stop", {"type": "message_stop"}
