"""AsyncEngine: LLMEngine.step on its own thread; asyncio callers stream RequestOutput deltas."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from model.sampling_params import SamplingParams
from scheduler.config import DEFAULT_MAX_PENDING_OUTPUTS, EngineConfig
from scheduler.engine import LLMEngine
from scheduler.errors import EngineDeadError, EngineFatalError
from scheduler.outputs import RequestOutput, SchedulerStats

logger = logging.getLogger(__name__)

StatListener = Callable[[SchedulerStats, list[RequestOutput]], None]


class RequestStream:
    """Async iterator over one queued request's outputs; closing it early aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self._finished = False
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._closed:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.finished:
            self._finished = True
            self.close()
        return out

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop consuming; a request that is still running is aborted."""
        if not self._closed:
            self._closed = True
            self._engine._release(self.request_id, self._finished)

    def __del__(self) -> None:
        # NOTE: a stream dropped unconsumed (its handler failed before iterating) must not keep
        # generating. No locks here: the collector may run this on a thread that holds one, so
        # the step thread releases (and aborts) it; deque.append is atomic.
        if not getattr(self, "_closed", True):
            self._closed = True
            self._engine._dropped.append((self.request_id, self._finished))


class _Sink:
    """Where one request's outputs go: its loop's queue, and how many outputs were handed to the
    loop (`sent`, by the step thread) and reached the queue (`delivered`, by the loop)."""

    __slots__ = ("loop", "queue", "sent", "delivered")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue = loop, queue
        self.sent = self.delivered = 0  # NOTE: each written by one thread only

    def put(self, out: RequestOutput) -> None:
        """On the loop: the output joins the queue."""
        self.delivered += 1
        self.queue.put_nowait(out)

    def unread(self) -> int:
        """Outputs not read yet: queued, or still in the loop's callbacks (a stalled loop)."""
        return self.sent - self.delivered + self.queue.qsize()


class AsyncEngine:
    """Steps on one thread (asleep on a Condition while idle); outputs reach each request's
    asyncio.Queue by `loop.call_soon_threadsafe`, so the event loop never waits on the model."""

    def __init__(
        self,
        config: EngineConfig,
        step_thread: bool = True,  # False: no thread of ours; the caller steps in run_forever()
        max_pending_outputs: int = DEFAULT_MAX_PENDING_OUTPUTS,  # unread, then the request aborts
    ) -> None:
        self.engine = LLMEngine(config)
        self.engine.warm_up_constraints()  # NOTE: a server's loop must never wait on it
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.model_name = self.engine.model_name
        self.model_config = self.engine.model_config
        self.max_num_seqs = self.engine.max_num_seqs
        self.default_sampling_params = self.engine.default_sampling_params  # generation config
        self.pooler_config = self.engine.pooler_config  # None unless --runner pooling
        self._cond = threading.Condition()  # wakes the step thread; notified after every step
        self._lock = threading.Lock()  # guards _streams, _error and starting the step thread
        self._streams: dict[str, _Sink] = {}
        self._listeners: list[StatListener] = []
        self._thread: threading.Thread | None = None  # the thread that steps (ours or a caller's)
        self._spawn = step_thread  # False: the caller's thread steps, in run_forever()
        self._loop_done = threading.Event()
        self._stopping = False
        self._closed = False
        self._error: str | None = None
        self.max_pending_outputs = max_pending_outputs
        self._overflowed: set[str] = set()  # requests aborted because their consumer lagged
        # streams the garbage collector finalized unclosed: (request id, finished), released by
        # the step thread (a finalizer takes no lock)
        self._dropped: deque[tuple[str, bool]] = deque()
        # a TP worker died: end every stream now; the step thread (maybe blocked in a collective)
        # frees the blocks when its step fails
        self.engine.executor.on_worker_death(lambda reason: self._fail(reason, free=False))

    def start(self) -> None:
        """Start the step thread (idempotent; nothing to start when run_forever() steps)."""
        with self._lock:  # the lifespan and a first request may race to start it
            if self._thread is not None or not self._spawn:
                return
            self._thread = threading.Thread(target=self._run, name="tokenmill-step", daemon=True)
        self._thread.start()

    def run_forever(self) -> None:
        """Step on the calling thread until shutdown() or stop() (needs step_thread=False, so no
        thread of ours steps the same scheduler).

        NOTE: `tokenmill serve` steps on its main thread: torch's OpenMP kernels run ~15% slower
        driven from another thread on these CPUs (35 vs 40 ms a decode step).
        """
        with self._lock:
            if self._spawn:
                raise RuntimeError("run_forever() needs an AsyncEngine made with step_thread=False")
            if self._thread is not None:
                raise RuntimeError("another thread already steps this engine")
            self._thread = threading.current_thread()
        self._run()

    def stop(self) -> None:
        """Make run_forever() return (e.g. when the HTTP server could not start)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Let running requests finish for up to `timeout` seconds, abort the rest, stop."""
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._thread is not None and not self._loop_done.is_set():
            await loop.run_in_executor(None, self._wait_idle, timeout)
            with self._lock:
                rest = list(self._streams)
            for rid in rest:
                self.engine.abort_request(rid)
            self._wake()
            await loop.run_in_executor(None, self._wait_idle, 10.0)
            self.stop()
            await loop.run_in_executor(None, self._loop_done.wait, 10.0)
        self.engine.shutdown()

    def _wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: self._error is not None or not self.engine.has_unfinished_requests(),
                timeout,
            )

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(
                        lambda: (
                            self._stopping
                            or self._error is not None
                            or self.engine.has_unfinished_requests()
                        )
                    )
                    if self._stopping:
                        return
                if self._error is not None:  # a TP worker died while we were idle
                    return self._fail(self._error)
                self._release_dropped()
                try:
                    outputs = self.engine.step()  # NOTE: a fault in one batch fails only it
                    stats = self.engine.get_stats()
                except Exception as exc:
                    logger.exception("engine step failed fatally; failing every in-flight request")
                    message = f"engine step failed: {type(exc).__name__}: {exc}"
                    return self._fail(str(exc) if isinstance(exc, EngineFatalError) else message)
                self._notify(outputs, stats)  # NOTE: before delivery: metrics lead what clients see
                self._deliver(outputs)
                self._wake()
        finally:
            self._loop_done.set()

    def _notify(self, outputs: list[RequestOutput], stats: SchedulerStats | None = None) -> None:
        """Hand listeners the outputs where a sample finished (n > 1 may finish in other steps)."""
        finished = [o for o in outputs if o.finished or any(c.finish_reason for c in o.outputs)]
        if stats is None:
            try:
                stats = self.engine.get_stats()
            except Exception:
                stats = SchedulerStats()
        for fn in self._listeners:
            try:
                fn(stats, finished)
            except Exception:
                logger.exception("stat listener %r failed", fn)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # the consumer is gone (its abort is on the way)
            # NOTE: callbacks pending behind a stalled loop count too: they hold outputs as well
            if stream.unread() >= self.max_pending_outputs and not out.finished:
                self._cut_off(out.request_id)
            try:
                stream.loop.call_soon_threadsafe(stream.put, out)
                stream.sent += 1
            except RuntimeError:  # its event loop is closed
                logger.debug("dropping output of %s: event loop closed", out.request_id)

    def _cut_off(self, request_id: str) -> None:
        """Abort a request whose consumer left `max_pending_outputs` outputs unread."""
        with self._lock:
            if request_id in self._overflowed:
                return
            self._overflowed.add(request_id)
        reason = (
            f"client too slow: {self.max_pending_outputs} outputs unread "
            "(--max-pending-outputs); request aborted"
        )
        logger.warning("aborting %s: %s", request_id, reason)
        self.engine.abort_request(request_id, error=reason)

    def _fail(self, message: str, free: bool = True) -> None:
        """Mark unhealthy, then end every stream with finish_reason "error" (none may hang);
        `free`: also finish the engine's requests and free their blocks (the step thread only)."""
        with self._lock:
            if free or self._error is None:
                self._error = message
            waiting = set(self._streams)
        outputs: list[RequestOutput] = []
        try:
            if free:
                outputs = [o for o in self.engine.fail_all(message) if o.request_id in waiting]
        except Exception:
            logger.exception("could not clean up after the failed step")
        done = {o.request_id for o in outputs}
        outputs += [RequestOutput.failed(rid, message) for rid in waiting - done]
        self._notify(outputs)
        self._deliver(outputs)
        self._wake()

    def encode(self, request_id: str, prompt: list[int]) -> RequestStream:
        """A pooling request (--runner pooling): one output, `embedding` set; as generate()."""
        return self.generate(request_id, prompt, None)

    def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None
    ) -> RequestStream:
        """Queue a request now; returns the stream of its RequestOutput deltas (the last one has
        `finished=True`), so a server can start its response at once.

        Args:
            request_id: unique among running requests (ValueError otherwise).
            prompt: text (tokenized here, on the caller's thread) or token ids.
            params: validated sampling parameters.
        Raises (before anything is queued): SamplingParamsError (PromptTooLongError,
        ConstraintError, ...) for invalid input, EngineDeadError once the engine failed or closed.
        Closing the stream (`aclose()`, or dropping it) aborts the request.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._release_dropped()
        with self._lock:
            if self._error is not None:
                raise EngineDeadError(self._error)
            if self._closed:
                raise EngineDeadError("engine is shut down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = _Sink(loop, queue)
        try:
            self.engine.add_request(request_id, prompt, params, arrival_time=time.monotonic())
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        self.start()
        self._wake()
        return RequestStream(self, request_id, queue)

    async def prepare(self, params: list[SamplingParams]) -> None:
        """Compile the requests' constraints off the event loop (the server's first also builds
        llguidance's tokenizer, ~1 s), so that generate() admits them at once.
        Raises ConstraintError naming the field."""
        if self._closed or self._error is not None:
            return  # generate() says why (EngineDeadError); the compile thread may be gone
        specs = {p.structured_outputs for p in params} - {None}
        for spec in specs:
            await asyncio.wrap_future(self.engine.compile_constraint(spec))

    def _release_dropped(self) -> None:
        """Release the streams finalized unclosed since the last call (never from __del__)."""
        while True:
            try:
                request_id, finished = self._dropped.popleft()
            except IndexError:
                return
            self._release(request_id, finished)

    def _release(self, request_id: str, finished: bool) -> None:
        """The consumer is done with a stream: forget it, and abort the request if it runs."""
        with self._lock:
            self._streams.pop(request_id, None)
            self._overflowed.discard(request_id)
        if not finished:
            self.engine.abort_request(request_id)
            self._wake()

    async def abort(self, request_id: str) -> None:
        """Abort at the next step; the request's stream ends with finish_reason "abort"."""
        self.engine.abort_request(request_id)
        self._wake()

    def is_healthy(self) -> bool:
        return self.dead_reason is None

    @property
    def fatal_error(self) -> str | None:
        """Why the engine can no longer serve (failed step, dead worker); `tokenmill serve` then
        exits non-zero, so a supervisor restarts it. None after a clean shutdown."""
        return self._error

    @property
    def dead_reason(self) -> str | None:
        """Why is_healthy() is False (failed step, dead TP worker, shutdown); None if healthy."""
        if self._error is not None:
            return self._error
        if self.engine.dead_reason is not None:
            return self.engine.dead_reason
        t = self._thread
        if self._stopping or t is None or not t.is_alive() or self._loop_done.is_set():
            return "the engine is not running"
        return None

    def get_stats(self) -> SchedulerStats:
        return self.engine.get_stats()

    def num_waiting(self) -> int:
        return self.engine.num_waiting()

    def add_stat_listener(self, fn: StatListener) -> None:
        """`fn(stats, finished_outputs)` runs on the step thread after each step (keep it cheap),
        and once now with `[]`, so gauges start filled."""
        self._listeners.append(fn)
        fn(self.get_stats(), [])
