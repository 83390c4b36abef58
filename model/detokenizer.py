"""Incremental detokenizer: token ids → complete UTF-8 text deltas, with stop strings held back."""

from __future__ import annotations

import bisect
import logging
from typing import Protocol

logger = logging.getLogger(__name__)

# prompt tokens kept as left context, so the first output token's leading space decodes right
_PROMPT_CONTEXT = 5
# undecodable tokens pending before we give up waiting for a UTF-8 char to complete (max 4 bytes)
_MAX_PENDING = 8
_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decodes a sliding window (vLLM's prefix/read offsets), so each token costs O(window).

    `_ids[:_read]` is context that was already emitted (it fixes spacing for SentencePiece and
    byte-level BPE); `_ids[_read:]` are tokens whose text is not emitted yet (e.g. half a UTF-8
    char). Text that could be the start of a stop string waits in `_held`.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        stop = list(stop or [])  # NOTE: non-empty strings: SamplingParams.validate checks
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._read = len(self._ids)
        self._prefix_text: str | None = None  # decode(_ids[:_read]), cached until the window slides
        self._held = ""
        self.output_text = ""
        self.stopped: str | None = None  # the stop string that matched, once one has
        # per stepped token, the length of all decoded text once its text is decoded: the token
        # is fully returned when that end is within output_text (not held back, not past a stop)
        self._token_ends: list[int] = []
        self._decoded_chars = 0
        self._undecoded = 0  # stepped tokens still in the window (e.g. half a UTF-8 char)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _window_delta(self, force: bool = False) -> str:
        """Pending tokens' text if it ends in a whole char (or `force`); slides the window."""
        if self._read == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[: self._read])
        full = self._decode(self._ids)
        if full == self._prefix_text:
            # NOTE: these tokens add no text (skipped special tokens): drop them from the window
            del self._ids[self._read :]
            return ""
        too_long = len(self._ids) - self._read > _MAX_PENDING
        if full.endswith(_REPLACEMENT) and not (force or too_long):
            return ""  # half a multi-byte char: wait for the rest
        if too_long and not force:
            logger.debug("emitting %d tokens that do not decode to complete UTF-8", _MAX_PENDING)
        # NOTE: for a prefix the decoder already settled, `full` starts with `_prefix_text`
        delta = full[len(self._prefix_text) :]
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = None
        return delta

    def step(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Add sampled tokens; return (new complete text to emit, the stop string that matched)."""
        if self.stopped is not None:
            return "", None
        text = []
        for tok in new_token_ids:
            self._ids.append(tok)
            self._undecoded += 1
            text.append(self._decoded(self._window_delta()))
        return self._release("".join(text))

    def _decoded(self, delta: str) -> str:
        """Record where the window's tokens end once their text is decoded."""
        self._decoded_chars += len(delta)
        if self._read == len(self._ids) and self._undecoded:
            self._token_ends.extend([self._decoded_chars] * self._undecoded)
            self._undecoded = 0
        return delta

    @property
    def num_returned_tokens(self) -> int:
        """Stepped tokens whose whole text is in output_text (what logprobs may report)."""
        return bisect.bisect_right(self._token_ends, len(self.output_text))

    def flush(self) -> str:
        """Release what is held back (stop-string prefix, partial bytes) when the sequence ends."""
        if self.stopped is not None:
            return ""
        text, _ = self._release(self._decoded(self._window_delta(force=True)), final=True)
        return text

    def _release(self, text: str, final: bool = False) -> tuple[str, str | None]:
        """Find stop strings in held + new text; emit all but a suffix that may start one."""
        pending = self._held + text
        if not self.stop:
            self._held = ""
            self.output_text += pending
            return pending, None
        found = [(i, s) for s in self.stop if (i := pending.find(s)) != -1]
        if found:
            i, s = min(found, key=lambda m: m[0])  # the earliest; on a tie, the first listed
            out = pending[: i + len(s)] if self.include_stop_str_in_output else pending[:i]
            self._held = ""
            self.stopped = s
            self.output_text += out
            return out, s
        hold = 0 if final else self._stop_prefix_len(pending)
        out, self._held = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.output_text += out
        return out, None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
