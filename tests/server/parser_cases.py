"""Shared by the parser tests: the chat-template fixtures, a tool, and a stream joiner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent / "chat_templates"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def stream_events(streamer: Any, text: str, size: int = 1) -> list:
    """Feed `text` in `size`-character pieces, then flush: every event in order."""
    events = []
    for i in range(0, len(text), size):
        events += streamer.feed(text[i : i + size])
    return events + streamer.flush()


def joined(events: list) -> tuple[str, list[tuple[str, str]]]:
    """Content and (name, arguments) per call, joined from streamed events."""
    content, calls = "", []
    for ev in events:
        if isinstance(ev, str):
            content += ev
        elif ev.id is not None:
            assert ev.name and not ev.arguments  # id and name come first, alone
            calls.append([ev.name, ""])
        else:
            calls[ev.index][1] += ev.arguments
    return content, [tuple(c) for c in calls]
