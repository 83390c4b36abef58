"""Magistral (Mistral's reasoning models, v13 tokenizers): `[THINK]…[/THINK]`, two special
tokens, so the detokenizer must keep special tokens; the model opens the block itself."""

from __future__ import annotations

from server.reasoning.base import ReasoningParser


class MistralReasoningParser(ReasoningParser):
    name = "mistral"
    start_tag = "[THINK]"
    end_tag = "[/THINK]"
    implicit_start = False
    keep_special_tokens = True
