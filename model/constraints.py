"""Constrained decoding: grammars (JSON schema, regex, choice, Lark) → per-step token bitmasks.

llguidance (README "Structured outputs"): each constraint compiles once into a template matcher
(an LRU bounded by bytes) that every sequence deep-copies. The server compiles on the compiler's
own thread (`compile_async`), off its event loop. Matchers live on rank 0 only, outside the step
contract.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from model import bitmask as masks
from model.sampling_params import SamplingParamsError, StructuredOutputsParams

logger = logging.getLogger(__name__)


class ConstraintError(SamplingParamsError):
    """An invalid schema, regex, choice list or grammar; the message says what is wrong."""


def grammar_of(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (JSON-encoded) for one constraint spec; no tokenizer needed."""
    import llguidance
    from llguidance.gbnf_to_lark import gbnf_to_lark

    M = llguidance.LLMatcher
    if spec.kind == "json":
        try:
            schema = json.loads(spec.spec)
        except ValueError as e:
            raise ConstraintError(f"the JSON schema is not valid JSON: {e}", spec.param) from e
        if not isinstance(schema, dict):
            raise ConstraintError("the JSON schema must be an object", spec.param)
        return M.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    if spec.kind == "json_object":
        return M.grammar_from_json_schema({"type": "object"})
    if spec.kind == "regex":
        return M.grammar_from_regex(spec.spec)
    if spec.kind == "choice":
        choices = json.loads(spec.spec)
        return M.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        )
    if spec.kind == "grammar":
        text = spec.spec
        if "::=" in text and not re.search(r"^\s*start\s*:", text, re.M):  # GBNF (llama.cpp)
            try:
                text = gbnf_to_lark(text)
            except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions
                raise ConstraintError(f"invalid grammar: {e}", spec.param) from e
        return M.grammar_from_lark(text)
    raise ConstraintError(f"unknown constraint kind {spec.kind!r}", spec.param)


DEFAULT_CACHE_BYTES = 64 * 1024 * 1024  # of constraint text + grammar kept compiled (LRU)


class ConstraintCompiler:
    """Compiles constraints against one tokenizer; keeps the most recent compiled ones, up to
    `cache_bytes` of their text (a template's memory grows with its schema and grammar)."""

    def __init__(
        self,
        hf_tokenizer: Any,
        vocab_size: int,
        eos_token_ids: list[int],
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        fill_during_forward: bool = False,
    ) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.cache_bytes = cache_bytes
        self.words = (vocab_size + 31) // 32  # int32 words per bitmask row
        self.eos_bits = _eos_bits(self.eos_token_ids)
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()  # add_request may run on several threads
        self._tokenizer_lock = threading.Lock()  # held for the ~1 s build, not with _lock
        # spec → (template, its bytes); insertion order is recency
        self._cache: OrderedDict[StructuredOutputsParams, tuple[Any, int]] = OrderedDict()
        self.cached_bytes = 0
        self._fill_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-mask")
        self._compile_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-grammar")
        self.overlap = True  # the next step's masks fill on a thread once its tokens are accepted
        # NOTE: on a CPU the forward's OpenMP threads own every core, and a fill thread beside
        # them slows the step more than it saves (README): fills there end before the forward
        self.fill_during_forward = fill_during_forward
        # a row whose last step was greedy gets no mask ahead: the sampler fills it only if the
        # model's own pick breaks the grammar (else that pick is the masked argmax too)
        self.lazy = not fill_during_forward
        self._next: _Fill | None = None  # the fill started by `prefetch`, for the next batch
        self._executor: Any = None
        self.compile_times: list[float] = []  # seconds of the last compiles (bounded)

    def _tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                import llguidance
                import llguidance.hf

                # NOTE: ~1 s once, on the first constrained request (not at start-up: most never
                # ask); the server runs it on the compile thread, off its event loop
                tok = llguidance.hf.from_tokenizer(
                    self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids
                )
                # NOTE: every core: its default (80% of them) is 1 thread on a 2-core machine
                self._executor = llguidance.LLExecutor(max(1, min(32, os.cpu_count() or 1)))
                self._ll_tokenizer = tok
            return self._ll_tokenizer

    def warm_up(self) -> None:
        """Build llguidance's tokenizer now rather than on the first constrained request."""
        self._tokenizer()

    def compile_async(self, spec: StructuredOutputsParams) -> Future:
        """compile(spec) on the compiler's own thread (a cache hit is a done future)."""
        with self._lock:
            hit = self._cache.get(spec)
        if hit is not None:
            done: Future = Future()
            done.set_result(hit[0])
            return done
        return self._compile_thread.submit(self.compile, spec)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """A template matcher for `spec` (cached); raises ConstraintError naming the field."""
        import llguidance

        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit[0]
        tok = self._tokenizer()
        t0 = time.perf_counter()
        grammar = grammar_of(spec)
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"invalid {spec.what}: {matcher.get_error()}", spec.param)
        elapsed = time.perf_counter() - t0
        size = len(spec.spec.encode()) + len(grammar.encode())
        with self._lock:
            self.compile_times = (self.compile_times + [elapsed])[-100:]
            if spec not in self._cache and size <= self.cache_bytes:
                self._cache[spec] = (matcher, size)
                self.cached_bytes += size
            while self.cached_bytes > self.cache_bytes:
                _, (_, evicted) = self._cache.popitem(last=False)
                self.cached_bytes -= evicted
        return matcher

    def matcher(self, spec: StructuredOutputsParams) -> Matcher:
        """A fresh matcher for one sequence (a copy of the cached template)."""
        return Matcher(self.compile(spec).deep_copy(), self.eos_token_ids)

    def batch(self, matchers: Sequence[Matcher | None]) -> ConstraintBatch | None:
        """The constrained rows of one step with their masks filled (or filling); None if none.

        Rows prefetched since their last token are reused; the others are filled now, or on
        the fill thread during the forward (`overlap` and `fill_during_forward`), or (`lazy`
        greedy rows) by the sampler only where it needs them."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        pre, self._next = self._next, None
        if not rows:
            if pre is not None:
                pre.wait()  # NOTE: no matcher may move while a fill reads it
            return None
        t0 = time.perf_counter()
        batch = ConstraintBatch(rows, [matchers[i] for i in rows], self)
        background = self.overlap and self.fill_during_forward
        if pre is not None:
            batch.fills.append(pre)  # waited for by the batch even if no row of it is used
            for i, m in enumerate(batch.matchers):
                at, j = pre.at.get(id(m), (None, 0))
                if at == m.num_tokens:  # its mask is for where it stands now
                    batch.where[i] = (0, j)
            if not background:
                pre.wait()
        missing = [
            i
            for i, m in enumerate(batch.matchers)
            if batch.where[i] is None and not (self.lazy and m.greedy)
        ]
        if missing:
            batch.fill(missing, background)
        batch.wait_time = time.perf_counter() - t0  # filling and waiting before the forward
        return batch

    def prefetch(self, matchers: Sequence[Matcher | None]) -> None:
        """Start filling the masks the next step will need, right after the tokens were accepted:
        the fill (llguidance drops the GIL) overlaps detokenizing and scheduling (and the forward
        with `fill_during_forward`). Lazy greedy rows are left to the sampler."""
        live = [
            m
            for m in matchers
            if m is not None and not m.is_finished and not (self.lazy and m.greedy)
        ]
        if self.overlap and live and self._next is None:
            self._next = _Fill(live, self.words, self.eos_bits).start(self, background=True)

    def settle(self) -> None:
        """Wait for the prefetched fill: it reads the matchers (speculation validates drafts)."""
        if self._next is not None:
            self._next.wait()

    def shutdown(self) -> None:
        """Stop both threads; compiles not yet started are cancelled."""
        self._fill_thread.shutdown(wait=False)
        self._compile_thread.shutdown(wait=False, cancel_futures=True)


class Matcher:
    """One sequence's position in its grammar; advanced by every accepted token."""

    __slots__ = ("ll", "eos_token_ids", "num_tokens", "greedy")

    def __init__(self, ll: Any, eos_token_ids: list[int]) -> None:
        self.ll = ll
        self.eos_token_ids = eos_token_ids
        self.num_tokens = 0  # tokens accepted (a sequence's output length while it matches)
        self.greedy = False  # its last step took the sampler's greedy masked argmax

    def allows(self, token_id: int) -> bool:
        """Whether this position's mask has `token_id` (~1 us, without filling the mask)."""
        if token_id in self.eos_token_ids:  # the fill sets every EOS bit where it may end
            return self.ll.is_accepting()
        return self.ll.validate_tokens([token_id]) == 1

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; an EOS at an accepting state ends the grammar."""
        self.num_tokens += 1
        if token_id in self.eos_token_ids and self.ll.is_accepting():
            return True
        ok = self.ll.consume_token(token_id)
        if not ok:
            logger.warning("constraint rejected token %d: %s", token_id, self.ll.get_error())
        return ok

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of `token_ids` (draft tokens) the grammar takes in a row from here; an EOS
        ends them (the mask decides it where it is sampled)."""
        eos = next((i for i, t in enumerate(token_ids) if t in self.eos_token_ids), None)
        return self.ll.validate_tokens(token_ids[:eos]) if token_ids[:eos] else 0

    def advanced(self, token_id: int) -> Matcher:
        """A copy one (valid) token on: the grammar state a draft token's row is sampled in."""
        m = Matcher(self.ll.deep_copy(), self.eos_token_ids)
        m.ll.consume_token(token_id)
        m.num_tokens = self.num_tokens + 1
        return m

    @property
    def is_finished(self) -> bool:
        """Nothing but EOS may follow (or the matcher failed): the sequence ends here."""
        return self.ll.is_stopped()


class _Fill:
    """One bitmask fill for some matchers: a step's own, or the next step's ahead of time."""

    def __init__(
        self, matchers: list[Matcher], words: int, eos_bits: tuple[np.ndarray, np.ndarray]
    ) -> None:
        self.matchers = matchers
        # id(matcher) → (the position its mask is for, its row)
        self.at = {id(m): (m.num_tokens, j) for j, m in enumerate(matchers)}
        self.bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)  # [rows, words]
        self.eos_bits = eos_bits
        self.seconds = 0.0  # how long the fill took
        self.future: Future | None = None

    def start(self, compiler: ConstraintCompiler, background: bool) -> _Fill:
        """Fill now, or on the compiler's fill thread."""
        if background:
            self.future = compiler._fill_thread.submit(self.run, compiler._executor)
        else:
            self.run(compiler._executor)
        return self

    def run(self, executor: Any) -> None:
        t0 = time.perf_counter()
        ptr, words = self.bitmask.data_ptr(), self.bitmask.shape[1]
        pairs = [(m.ll, j) for j, m in enumerate(self.matchers)]
        # NOTE: llguidance drops the GIL and spreads the rows over its own threads
        executor.unsafe_compute_mask_ptr(pairs, ptr, words * 4, len(pairs))
        # every end-of-turn id ends a complete grammar, not only the tokenizer's EOS
        accepting = [j for j, m in enumerate(self.matchers) if m.ll.is_accepting()]
        if accepting:
            eos_words, eos_bits = self.eos_bits
            self.bitmask.numpy()[np.ix_(accepting, eos_words)] |= eos_bits
        self.seconds = time.perf_counter() - t0

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()
            self.future = None


class ConstraintBatch:
    """One step's constrained rows: their matchers, and the bitmask rows filled for them."""

    def __init__(
        self, rows: list[int], matchers: list[Matcher], compiler: ConstraintCompiler
    ) -> None:
        self.rows = rows  # indices into the step's sampling rows
        self.matchers = matchers
        self.fills: list[_Fill] = []
        # per row: (fill, row in that fill), None while not filled (lazy)
        self.where: list[tuple[int, int] | None] = [None] * len(rows)
        self.compiler = compiler
        self.wait_time = 0.0  # seconds the step spent filling or waiting for fills
        self._bitmask: torch.Tensor | None = None

    @property
    def fill_time(self) -> float:
        """Seconds of mask filling behind this batch (on the fill thread when overlapped)."""
        return sum(f.seconds for f in self.fills)

    def wait(self) -> None:
        t0 = time.perf_counter()
        for f in self.fills:
            f.wait()
        self.wait_time += time.perf_counter() - t0

    def fill(self, idx: list[int], background: bool = False) -> None:
        """Fill rows `idx` (positions in `rows`): now, on the step's path, or on the fill
        thread."""
        t0 = time.perf_counter()
        c = self.compiler
        fill = _Fill([self.matchers[i] for i in idx], c.words, c.eos_bits)
        self.fills.append(fill.start(c, background))
        for j, i in enumerate(idx):
            self.where[i] = (len(self.fills) - 1, j)
        self._bitmask = None
        self.wait_time += time.perf_counter() - t0

    def _bitmask_of(self, idx: list[int]) -> torch.Tensor:
        """The bitmasks [len(idx), words] of rows `idx`, each filled already."""
        first = self.where[idx[0]]
        if all(self.where[i] == (first[0], first[1] + k) for k, i in enumerate(idx)):
            return self.fills[first[0]].bitmask[first[1] : first[1] + len(idx)]  # a view
        return torch.stack([self.fills[self.where[i][0]].bitmask[self.where[i][1]] for i in idx])

    @property
    def bitmask(self) -> torch.Tensor:
        """The rows' bitmasks [rows, words], once every fill is done (rows not filled yet are
        filled now)."""
        if self._bitmask is None:
            self.wait()
            missing = [i for i, w in enumerate(self.where) if w is None]
            if missing:
                self.fill(missing)
            self._bitmask = self._bitmask_of(list(range(len(self.rows))))
        return self._bitmask

    def allowed(self, vocab: int, device: torch.device) -> torch.Tensor:
        """Bool mask [rows, vocab] of the tokens each constrained row may sample."""
        return masks.allowed_mask(self.bitmask, vocab, device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with each constrained row's forbidden tokens at -inf (a new tensor)."""
        for m in self.matchers:
            m.greedy = False
        return masks.apply(logits, self.bitmask, self.rows)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Every logits row's greedy token [n]; constrained rows pick among their allowed tokens.

        A row without a mask keeps the model's own pick when its grammar allows it (that pick
        is then the masked argmax as well: masking only removes tokens); only the others fill."""
        for m in self.matchers:
            m.greedy = True
        self.wait()
        lazy = [i for i, w in enumerate(self.where) if w is None]
        if not lazy:
            return masks.argmax(logits, self.bitmask, self.rows)
        picks = masks.argmax_free(logits)  # [n]
        ids = picks.tolist()
        vocab = self.compiler.vocab_size
        broken = [
            i
            for i in lazy
            if not (ids[self.rows[i]] < vocab and self.matchers[i].allows(ids[self.rows[i]]))
        ]
        if broken:
            self.fill(broken)
        need = [i for i, w in enumerate(self.where) if w is not None]
        if need:
            rows = [self.rows[i] for i in need]
            picks[torch.tensor(rows)] = masks.argmax_rows(logits, self._bitmask_of(need), rows)
        return picks


def _eos_bits(eos_token_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The bitmask words that hold EOS ids, and their EOS bits (as int32), to OR into a row."""
    words = sorted({t // 32 for t in eos_token_ids})
    bits = [sum(1 << (t % 32) for t in set(eos_token_ids) if t // 32 == w) for w in words]
    return np.array(words, dtype=np.intp), np.array(bits, dtype=np.uint32).view(np.int32)
