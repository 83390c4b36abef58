"""/v1/responses (OpenAI's Responses API) translated onto the chat path: items → one chat
request (same template, tool and JSON grammars, engine) → output items; the bounded store."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from pydantic import ValidationError

from server.errors import APIError, error_body, from_exception
from server.protocol.chat import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from server.protocol.responses import (
    DeletedResponse,
    InputItemList,
    InputTokensDetails,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from server.response_store import ResponseStore
from server.serving_chat import OpenAIServingChat
from server.serving_messages import vllm_extras
from server.sse import EventStream

# chat request fields → the Responses API's, for the param of an error the chat path raised
PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text"}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _not_found(what: str, response_id: str, param: str | None = None) -> APIError:
    return APIError(f"{what} with id '{response_id}' not found.", 404, param=param)


def stored_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as stored and listed: typed items, each with an id."""
    if isinstance(req.input, str):
        part = {"type": "input_text", "text": req.input}
        return [{"type": "message", "id": _id("msg"), "role": "user", "content": [part],
                 "status": "completed"}]  # fmt: skip
    out = []
    for item in req.input:
        if item.type == "message":
            kind = "output_text" if item.role == "assistant" else "input_text"
            parts = [{"type": kind, "text": item.text}]
            out.append({"type": "message", "id": item.id or _id("msg"), "role": item.role,
                        "content": parts, "status": "completed"})  # fmt: skip
        elif item.type == "function_call":
            out.append({"type": "function_call", "id": item.id or _id("fc"),
                        "call_id": item.call_id, "name": item.name, "arguments": item.arguments,
                        "status": "completed"})  # fmt: skip
        elif item.type == "function_call_output":
            out.append({"type": "function_call_output", "id": item.id or _id("fco"),
                        "call_id": item.call_id, "output": item.text,
                        "status": "completed"})  # fmt: skip
        else:
            summary = [{"type": p.type, "text": p.text} for p in item.summary]
            stored = {"type": "reasoning", "id": item.id or _id("rs"), "summary": summary}
            if item.content is not None:
                stored["content"] = [{"type": p.type, "text": p.text} for p in item.content]
            out.append(stored)
    return out


def _reasoning_text(item: dict[str, Any]) -> str:
    """A stored reasoning item's text: its content, or its summary where it has no content."""
    return "\n".join(p["text"] for p in item.get("content") or item["summary"])


def _thinking_turn(message: dict[str, Any]) -> bool:
    """An assistant turn that so far holds only reasoning (the items after it fill it in)."""
    return message["role"] == "assistant" and "reasoning_content" in message and not (
        message["content"] or message.get("tool_calls"))  # fmt: skip


def chat_messages(items: list[dict[str, Any]], reasoning: bool = False) -> list[dict[str, Any]]:
    """Stored items → chat messages: function calls join the assistant turn before them, their
    outputs become tool messages; with `reasoning` (a reasoning parser is set) a reasoning item
    opens the assistant turn that follows it as its reasoning_content, else it is dropped."""
    out: list[dict[str, Any]] = []
    for it in items:
        if it["type"] == "reasoning":
            text = _reasoning_text(it)
            if not (reasoning and text):
                continue
            if out and _thinking_turn(out[-1]):
                out[-1]["reasoning_content"] += "\n" + text
            else:
                out.append({"role": "assistant", "content": "", "reasoning_content": text})
        elif it["type"] == "message":
            text = "".join(p.get("text") or "" for p in it["content"])
            if it["role"] == "assistant" and out and _thinking_turn(out[-1]):
                out[-1]["content"] = text
                continue
            out.append({"role": it["role"], "content": text})
        elif it["type"] == "function_call":
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it["arguments"]}}  # fmt: skip
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": ""})
            out[-1].setdefault("tool_calls", []).append(call)
        elif it["type"] == "function_call_output":
            out.append({"role": "tool", "tool_call_id": it["call_id"], "content": it["output"]})
    return out


def to_chat(
    req: ResponsesRequest, items: list[dict[str, Any]], reasoning: bool = False
) -> ChatCompletionRequest:
    """The chat request that generates this response: instructions, history (reasoning items
    too, with `reasoning`), tools, format."""
    messages = chat_messages(items, reasoning)
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    body: dict[str, Any] = {**vllm_extras(req), "model": req.model, "messages": messages,
                            "parallel_tool_calls": req.parallel_tool_calls}  # fmt: skip
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in req.tools
        ]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = choice if isinstance(choice, str) else {
            "type": "function", "function": {"name": choice.name}
        }  # fmt: skip
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError("text.format json_schema needs a schema", 400, param="text.format")
        spec = {"name": fmt.name or "output", "schema": fmt.schema_, "strict": fmt.strict}
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    given = {"max_tokens": req.max_output_tokens, "temperature": req.temperature,
             "top_p": req.top_p, "user": req.user}  # fmt: skip
    body.update({k: v for k, v in given.items() if v is not None})
    if req.stream:
        body.update(stream=True, stream_options={"include_usage": True})
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise APIError(f"{where}: {first.get('msg')}", 400) from e


def _usage(prompt: int, cached: int, output: int) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=prompt,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=output,
        total_tokens=prompt + output,
    )


def _message(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": item_id or _id("msg"), "status": status,
            "role": "assistant", "content": [part] if status == "completed" else []}  # fmt: skip


def _reasoning(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    """A reasoning item: the parser's text as reasoning_text content (no summary is made)."""
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"type": "reasoning", "id": item_id or _id("rs"), "summary": [], "content": content,
            "status": status}  # fmt: skip


def _call(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": _id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}  # fmt: skip


class ServingResponses:
    """The Responses API over the chat endpoint, and its store."""

    def __init__(self, chat: OpenAIServingChat, store: ResponseStore) -> None:
        self.chat = chat
        self.store = store

    async def create(self, req: ResponsesRequest, owner: str) -> Any:
        """The three-way return: a ResponseObject, an EventStream, or an APIError."""
        try:
            if req.background:
                raise APIError("background responses are not supported", 400, param="background")
            items = stored_items(req)
            history: list[dict[str, Any]] = []
            if req.previous_response_id is not None:
                found = self.store.history(req.previous_response_id, owner)
                if found is None:
                    prev = req.previous_response_id
                    raise _not_found("Previous response", prev, "previous_response_id")
                history = found
            chat_req = to_chat(req, history + items, self.chat.reasoning is not None)
        except APIError as e:
            return e
        result = await self.chat.create(chat_req)
        if isinstance(result, APIError):
            result.param = PARAMS.get(result.param or "", result.param)
            return result
        base = self._base(req)
        if isinstance(result, ChatCompletionResponse):
            choice = result.choices[0]
            reasoning = choice.message.reasoning
            output = [_reasoning(reasoning)] if reasoning else []
            if choice.message.content or not (choice.message.tool_calls or reasoning):
                output.append(_message(choice.message.content or ""))
            for c in choice.message.tool_calls or []:
                output.append(_call(c.id, c.function.name, c.function.arguments))
            details = result.usage.prompt_tokens_details
            cached = details.cached_tokens if details else 0
            usage = _usage(result.usage.prompt_tokens, cached, result.usage.completion_tokens)
            return self._finish(base, output, choice.finish_reason, usage, owner, items, req)
        events = self._events(base, result, owner, items, req)
        return EventStream(events, lambda err: ("error", _error_event(err, 0)))

    def _base(self, req: ResponsesRequest) -> ResponseObject:
        fmt = req.text.format if req.text and req.text.format else None
        text = {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {
            "type": "text"}}  # fmt: skip
        choice = req.tool_choice or "auto"
        return ResponseObject(
            id=_id("resp"),
            created_at=int(time.time()),
            status="in_progress",
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            model=req.model or self.chat.engine.model_name,
            output=[],
            parallel_tool_calls=req.parallel_tool_calls,
            previous_response_id=req.previous_response_id,
            reasoning=req.reasoning,
            store=req.store,
            temperature=req.temperature,
            text=text,
            tool_choice=choice if isinstance(choice, str) else choice.model_dump(),
            tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
            top_p=req.top_p,
            user=req.user,
            metadata=req.metadata or {},
        )

    def _finish(
        self,
        base: ResponseObject,
        output: list[dict],
        finish: str | None,
        usage: ResponseUsage | None,
        owner: str,
        items: list[dict[str, Any]],
        req: ResponsesRequest,
    ) -> ResponseObject:
        """The final response (completed, or incomplete at max_output_tokens), stored if asked."""
        done = base.model_copy(update={"output": output, "usage": usage, "status": "completed"})
        if finish == "length":
            done.status = "incomplete"
            done.incomplete_details = {"reason": "max_output_tokens"}
        if req.store:
            self.store.put(owner, done.model_dump(), items)
        return done

    async def _events(
        self,
        base: ResponseObject,
        chunks: AsyncIterator[ChatCompletionChunk],
        owner: str,
        items: list[dict[str, Any]],
        req: ResponsesRequest,
    ) -> AsyncIterator[tuple[str, dict]]:
        """Chat chunks → the Responses stream: created, in_progress, each output item (added,
        its deltas, done), then completed or incomplete; an engine error ends it as failed."""
        stream = _ItemStream()
        yield stream.event("response.created", response=base.model_dump())
        yield stream.event("response.in_progress", response=base.model_dump())
        finish, usage = None, None
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    if chunk.usage is not None and not chunk.choices:
                        u = chunk.usage
                        cached = u.prompt_tokens_details.cached_tokens if (
                            u.prompt_tokens_details) else 0  # fmt: skip
                        usage = _usage(u.prompt_tokens, cached, u.completion_tokens)
                    for c in chunk.choices:
                        delta = c.delta
                        for event in stream.feed(delta.reasoning, delta.content, delta.tool_calls):
                            yield event
                        finish = c.finish_reason or finish
            for event in stream.close(empty_message=not stream.output):
                yield event
            done = self._finish(base, stream.output, finish, usage, owner, items, req)
        except Exception as e:  # noqa: BLE001 - the stream has started: it ends as failed
            err = from_exception(e)
            failed = base.model_copy(update={"status": "failed", "output": stream.output})
            failed.error = {"code": "server_error", "message": err.message}
            yield stream.event("response.failed", response=failed.model_dump())
            return
        name = "response.incomplete" if done.status == "incomplete" else "response.completed"
        yield stream.event(name, response=done.model_dump())

    def retrieve(self, response_id: str, owner: str) -> ResponseObject | APIError:
        entry = self.store.get(response_id, owner)
        if entry is None:
            return _not_found("Response", response_id, "response_id")
        return ResponseObject.model_validate(entry.response)

    def delete(self, response_id: str, owner: str) -> DeletedResponse | APIError:
        if not self.store.delete(response_id, owner):
            return _not_found("Response", response_id, "response_id")
        return DeletedResponse(id=response_id)

    def input_items(
        self, response_id: str, owner: str, after: str | None, limit: int, order: str
    ) -> InputItemList | APIError:
        """A page of the response's input items, newest first unless order is asc."""
        entry = self.store.get(response_id, owner)
        if entry is None:
            return _not_found("Response", response_id, "response_id")
        if not 1 <= limit <= 100:
            return APIError(f"limit must be in [1, 100], got {limit}", 400, param="limit")
        if order not in ("asc", "desc"):
            return APIError(f"order must be 'asc' or 'desc', got {order!r}", 400, param="order")
        items = entry.input_items if order == "asc" else entry.input_items[::-1]
        if after is not None:
            ids = [it["id"] for it in items]
            if after not in ids:
                return _not_found("Input item", after, "after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return InputItemList(
            data=page,
            first_id=page[0]["id"] if page else None,
            last_id=page[-1]["id"] if page else None,
            has_more=len(items) > limit,
        )


def _error_event(err: APIError, seq: int) -> dict:
    body = error_body(err.message, err.status_code, err.param, err.code)["error"]
    return {**body, "type": "error", "code": err.code or body["type"], "sequence_number": seq}


class _ItemStream:
    """The output items of one streamed response: the open one, finished ones, numbered events."""

    def __init__(self) -> None:
        self.seq = 0
        self.output: list[dict] = []
        self.open: dict | None = None  # the item being streamed
        self.text = ""  # the open message's or reasoning item's text so far

    def event(self, event_type: str, **data: Any) -> tuple[str, dict]:
        out = {"type": event_type, **data, "sequence_number": self.seq}
        self.seq += 1
        return event_type, out

    def _where(self) -> dict:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.output)}

    def _start(self, item: dict) -> list[tuple[str, dict]]:
        """Close the open item, open `item`: output_item.added (+ content_part.added)."""
        events = self.close()
        self.open, self.text = item, ""
        index = len(self.output)
        events.append(self.event("response.output_item.added", output_index=index, item=item))
        part = None
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        elif item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": ""}
        if part is not None:
            where = self._where()
            events.append(self.event("response.content_part.added", **where, content_index=0,
                                     part=part))  # fmt: skip
        return events

    def feed(
        self, reasoning: str | None, content: str | None, calls: list | None
    ) -> list[tuple[str, dict]]:
        events = []
        if reasoning:
            if self.open is None or self.open["type"] != "reasoning":
                events += self._start(_reasoning("", "in_progress"))
            self.text += reasoning
            delta = dict(content_index=0, delta=reasoning)
            events.append(self.event("response.reasoning_text.delta", **self._where(), **delta))
        if content:
            if self.open is None or self.open["type"] != "message":
                events += self._start(_message("", "in_progress"))
            self.text += content
            delta = dict(content_index=0, delta=content, logprobs=[])
            events.append(self.event("response.output_text.delta", **self._where(), **delta))
        for call in calls or []:
            if call.id is not None:
                events += self._start(_call(call.id, call.function.name or "", "", "in_progress"))
            args = call.function.arguments
            if args and self.open is not None and self.open["type"] == "function_call":
                self.open = dict(self.open, arguments=self.open["arguments"] + args)
                name = "response.function_call_arguments.delta"
                events.append(self.event(name, **self._where(), delta=args))
        return events

    def close(self, empty_message: bool = False) -> list[tuple[str, dict]]:
        """Finish the open item (its done events); `empty_message`: an empty message if none."""
        if self.open is None:
            return self._start(_message("", "in_progress")) + self.close() if empty_message else []
        item, where, events = self.open, self._where(), []
        if item["type"] == "message":
            done = _message(self.text, item_id=item["id"])
            text = dict(content_index=0, text=self.text, logprobs=[])
            events.append(self.event("response.output_text.done", **where, **text))
            part = dict(content_index=0, part=done["content"][0])
            events.append(self.event("response.content_part.done", **where, **part))
        elif item["type"] == "reasoning":
            done = _reasoning(self.text, item_id=item["id"])
            text = dict(content_index=0, text=self.text)
            events.append(self.event("response.reasoning_text.done", **where, **text))
            part = dict(content_index=0, part=done["content"][0])
            events.append(self.event("response.content_part.done", **where, **part))
        else:
            done = dict(item, status="completed")
            args = dict(name=item["name"], arguments=item["arguments"])
            events.append(self.event("response.function_call_arguments.done", **where, **args))
        index = len(self.output)
        events.append(self.event("response.output_item.done", output_index=index, item=done))
        self.output.append(done)
        self.open = None
        return events
