"""DeepSeek-R1: its template ends the prompt with `<think>\\n`, so the reply starts inside the
reasoning (a `<think>` the model writes anyway is skipped); no `</think>` means all reasoning."""

from __future__ import annotations

from server.reasoning.base import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    implicit_start = True
