"""Qwen3 (and QwQ): the model opens `<think>` itself unless the template did (thinking-only
2507 models) or closed it already (`enable_thinking: false`)."""

from __future__ import annotations

from server.reasoning.base import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    implicit_start = False
