"""AsyncEngine: streamed deltas, a responsive loop, cancellation aborts, failures never hang."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from model.sampling_params import SamplingParams
from scheduler.async_engine import AsyncEngine
from scheduler.config import EngineConfig
from scheduler.errors import EngineDeadError, PromptTooLongError

pytestmark = pytest.mark.timeout(60)

GREEDY = dict(temperature=0.0, ignore_eos=True)


def config(tiny_checkpoint, **kw) -> EngineConfig:
    cfg = dict(
        model=str(tiny_checkpoint()),
        dtype="float32",
        device="cpu",
        kv_cache_memory=64 * 8192,
        max_model_len=512,
    )
    return EngineConfig(**(cfg | kw))


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = AsyncEngine(config(tiny_checkpoint))
    eng.start()
    yield eng
    asyncio.run(eng.shutdown(5.0))
    assert not eng.is_healthy()


async def collect(engine: AsyncEngine, rid: str, prompt, params) -> list:
    return [out async for out in engine.generate(rid, prompt, params)]


async def settle(engine: AsyncEngine) -> None:
    """Run one short request to the end: every abort queued before it has been applied."""
    await collect(engine, f"settle-{time.monotonic_ns()}", [1, 2, 3], SamplingParams(max_tokens=1))


async def test_concurrent_generate_streams_deltas(engine, assert_pool_free):
    seen, calls = [], []

    def listener(stats, finished) -> None:
        calls.append(stats)
        seen.extend(o.request_id for o in finished)

    engine.add_stat_listener(listener)
    assert len(calls) == 1 and calls[0].num_total_blocks == 64  # called once right away
    prompts = {f"c{i}": list(range(100 * i + 5, 100 * i + 5 + 3 + 4 * i)) for i in range(4)}
    alone = {
        rid: await collect(engine, rid, p, SamplingParams(max_tokens=6, **GREEDY))
        for rid, p in prompts.items()
    }
    together = await asyncio.gather(
        *(
            collect(engine, rid + "x", p, SamplingParams(max_tokens=6, **GREEDY))
            for rid, p in prompts.items()
        )
    )
    for (rid, outs), outs_x in zip(alone.items(), together, strict=True):
        assert len(outs) == len(outs_x) == 6  # one delta per token
        assert [o.finished for o in outs_x] == [False] * 5 + [True]
        assert outs_x[-1].outputs[0].finish_reason == "length"
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in outs_x]
        assert outs_x[0].prompt_token_ids == prompts[rid]
    assert {"c0", "c3x"} <= set(seen)
    assert engine.is_healthy() and engine.num_waiting() == 0
    assert_pool_free(engine.engine)


async def test_event_loop_stays_responsive_while_stepping(engine, assert_pool_free):
    """The model's execute waits until the event loop has run a task meanwhile: a step on the loop
    thread would deadlock here (and fail on the gate's timeout)."""
    inside, gate = threading.Event(), threading.Event()
    real = engine.engine.runner.execute

    def gated(step_input, *args, **kwargs):
        inside.set()
        if not gate.wait(10.0):
            raise RuntimeError("the event loop did not run while the model computed")
        return real(step_input, *args, **kwargs)

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while not inside.is_set():
            await asyncio.sleep(0.001)
        ticks += 1  # the loop runs while execute() is in progress
        gate.set()

    engine.engine.runner.execute = gated
    try:
        task = asyncio.create_task(ticker())
        outs = await collect(
            engine, "long", list(range(50, 90)), SamplingParams(max_tokens=20, **GREEDY)
        )
        await task
    finally:
        engine.engine.runner.execute = real
    assert ticks == 1 and len(outs) == 20 and outs[-1].finished
    assert outs[-1].outputs[0].finish_reason == "length"
    assert_pool_free(engine.engine)


async def test_closing_or_cancelling_the_consumer_aborts(engine, assert_pool_free):
    params = SamplingParams(max_tokens=400, **GREEDY)
    agen = engine.generate("closed", list(range(10, 60)), params)
    first = await agen.__anext__()
    assert not first.finished
    await agen.aclose()

    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate("cancelled", list(range(70, 90)), params):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle(engine)
    assert_pool_free(engine.engine)


@pytest.mark.parametrize("lock", ["AsyncEngine._lock", "LLMEngine._lock"])
async def test_a_stream_finalized_under_a_lock_aborts_without_deadlock(
    engine, assert_pool_free, lock
):
    """The collector may finalize a dropped stream on a thread that holds one of the engine's
    (non-reentrant) locks: the finalizer takes none, and the request is still aborted."""
    held = engine._lock if lock == "AsyncEngine._lock" else engine.engine._lock
    params = SamplingParams(max_tokens=400, **GREEDY)
    streams = [engine.generate("dropped", list(range(10, 40)), params)]
    done = threading.Event()

    def drop() -> None:
        with held:
            streams.clear()  # the last reference: __del__ runs here, under the lock
        done.set()

    threading.Thread(target=drop, daemon=True).start()
    assert done.wait(10), f"the stream's finalizer deadlocked on {lock}"
    await settle(engine)
    assert "dropped" not in engine._streams and "dropped" not in engine.engine.requests
    assert not engine._dropped
    assert_pool_free(engine.engine)


async def test_abort_ends_stream_with_abort(engine, assert_pool_free):
    agen = engine.generate("ab", list(range(10, 30)), SamplingParams(max_tokens=400, **GREEDY))
    outs = [await agen.__anext__()]
    await engine.abort("ab")
    outs += [o async for o in agen]
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs) < 400
    assert_pool_free(engine.engine)


async def test_generate_queues_now_and_validates_before_returning(engine):
    """The request is in the engine when generate() returns (a server can send headers at
    once); bad input raises from the call itself."""
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate("v1", [], SamplingParams())
    with pytest.raises(PromptTooLongError, match="prompt has 500 tokens"):
        engine.generate("v2", [5] * 500, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="stop_token_ids token id 999999"):
        engine.generate("v3", [5], SamplingParams(stop_token_ids=[999999]))
    assert not engine.engine.has_unfinished_requests()
    stream = engine.generate("queued", [5, 6, 7], SamplingParams(max_tokens=2, **GREEDY))
    assert engine.engine.has_unfinished_requests()  # before any __anext__
    outs = [o async for o in stream]
    assert outs[-1].finished and outs[-1].outputs[0].num_tokens == 2
    dropped = engine.generate("dropped", [5, 6, 7], SamplingParams(max_tokens=400, **GREEDY))
    del dropped  # never consumed: the request is aborted, not left running
    await settle(engine)
    assert not engine.engine.requests


async def test_a_failed_step_fails_only_its_requests(tiny_checkpoint):
    """One step raises: the requests it ran end with an error; a waiting one and new ones run."""
    eng = AsyncEngine(config(tiny_checkpoint, max_num_seqs=1))
    eng.start()
    running = eng.generate("f1", list(range(10, 20)), SamplingParams(max_tokens=300, **GREEDY))
    first = await running.__anext__()
    assert not first.finished
    waiting = eng.generate("f2", list(range(30, 40)), SamplingParams(max_tokens=5, **GREEDY))
    real = eng.engine.runner.execute
    calls = []

    def broken_once(step_input, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bad batch")
        return real(step_input, *args, **kwargs)

    eng.engine.runner.execute = broken_once  # fault injection at the model boundary
    try:
        rest = [o async for o in running]
        assert rest[-1].finished and rest[-1].error == "engine step failed: RuntimeError: bad batch"
        assert rest[-1].outputs[0].finish_reason == "error"
        outs = [o async for o in waiting]
        assert outs[-1].finished and outs[-1].error is None
        assert outs[-1].outputs[0].finish_reason == "length" and outs[-1].outputs[0].num_tokens == 5
        assert eng.is_healthy() and eng.fatal_error is None
        again = [o async for o in eng.generate("f3", [1, 2], SamplingParams(max_tokens=3))]
        assert again[-1].outputs[0].num_tokens == 3
        bm = eng.engine.block_manager
        assert bm.num_free_blocks == bm.num_total_blocks and bm.check_integrity()
    finally:
        eng.engine.runner.execute = real
        await eng.shutdown(1.0)


async def test_a_broken_device_kills_the_engine(tiny_checkpoint):
    """Bad batches in a row do not (an attacker could send them); a device error does."""
    eng = AsyncEngine(config(tiny_checkpoint))
    eng.start()
    real = eng.engine.runner.execute
    errors = iter(
        [RuntimeError("bad batch")] * 5 + [RuntimeError("CUDA error: an illegal memory access")]
    )

    def broken(step_input, *args, **kwargs):
        raise next(errors)

    eng.engine.runner.execute = broken
    for i in range(5):
        outs = [o async for o in eng.generate(f"p{i}", [1, 2, 3], SamplingParams(max_tokens=9))]
        assert outs[-1].finished and "bad batch" in outs[-1].error
        assert eng.is_healthy()
    outs = [o async for o in eng.generate("p-fatal", [1, 2, 3], SamplingParams(max_tokens=9))]
    assert outs[-1].finished and "illegal memory access" in outs[-1].error
    assert not eng.is_healthy() and "CUDA error" in eng.fatal_error
    with pytest.raises(EngineDeadError, match="CUDA error"):
        eng.generate("p-late", [1, 2], SamplingParams())
    assert eng.engine.block_manager.num_free_blocks == eng.engine.block_manager.num_total_blocks
    eng.engine.runner.execute = real
    await eng.shutdown(1.0)


async def test_shutdown_aborts_what_is_left(tiny_checkpoint):
    eng = AsyncEngine(config(tiny_checkpoint))
    eng.start()
    assert eng.is_healthy()
    agen = eng.generate("s1", list(range(10, 20)), SamplingParams(max_tokens=400, **GREEDY))
    await agen.__anext__()
    consumer = asyncio.create_task(asyncio.wait_for(_drain(agen), 30))
    await eng.shutdown(0.0)
    outs = await consumer
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert not eng.is_healthy()
    with pytest.raises(EngineDeadError):
        eng.generate("s2", [1], SamplingParams())


async def _drain(agen) -> list:
    return [o async for o in agen]


async def test_caller_thread_steps_and_nothing_else_can(tiny_checkpoint):
    """`tokenmill serve` steps on its main thread: a request or the lifespan arriving first must
    not start a second stepping thread (CI once saw two threads corrupt one scheduler)."""
    eng = AsyncEngine(config(tiny_checkpoint), step_thread=False)
    eng.start()  # what the lifespan does: a no-op here
    assert eng._thread is None and not eng.is_healthy()  # not stepping yet
    params = SamplingParams(max_tokens=8, **GREEDY)
    first = asyncio.create_task(collect(eng, "m1", list(range(10, 40)), params))
    await asyncio.sleep(0)  # let it queue; no thread of ours may pick it up
    assert eng._thread is None
    stepper = threading.Thread(target=eng.run_forever, name="caller")
    stepper.start()
    outs = await asyncio.wait_for(first, 30)
    assert outs[-1].finished and outs[-1].outputs[-1].num_tokens == 8
    assert eng._thread is stepper and eng.is_healthy()
    with pytest.raises(RuntimeError, match="already steps"):
        eng.run_forever()  # a second stepping loop is refused
    await eng.shutdown(5.0)
    stepper.join(10)
    assert not stepper.is_alive()
    own = AsyncEngine(config(tiny_checkpoint))  # step_thread=True: its own thread steps
    with pytest.raises(RuntimeError, match="step_thread=False"):
        own.run_forever()
    await own.shutdown(1.0)


def test_a_stalled_loop_holds_at_most_max_pending_outputs(tiny_checkpoint):
    """Outputs waiting as callbacks behind a stalled event loop count as unread: the request is
    cut off at max_pending_outputs, not left to pile up callbacks for all its tokens."""
    eng = AsyncEngine(config(tiny_checkpoint), max_pending_outputs=4)
    eng.start()
    loop = asyncio.new_event_loop()
    started, release, result = threading.Event(), threading.Event(), {}

    async def start_then_stall() -> list:
        params = SamplingParams(max_tokens=300, **GREEDY)
        stream = eng.generate("stalled", list(range(10, 20)), params)
        started.set()
        release.wait(60)  # the loop stalls: outputs can only queue up as its callbacks
        return [o async for o in stream]

    def run() -> None:
        result["outs"] = loop.run_until_complete(start_then_stall())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert started.wait(30)
        assert eng._wait_idle(60)  # the engine ended the request while the loop stalled
        pending = len(loop._ready)
    finally:
        release.set()
        thread.join(60)
        loop.close()
        asyncio.run(eng.shutdown(5.0))
    outs = result["outs"]
    assert pending == len(outs) == 6  # 4 unread + the one that found them + the abort
    assert [o.finished for o in outs] == [False] * 5 + [True]
    assert outs[-1].outputs[0].finish_reason == "abort"
    assert (
        outs[-1].error
        == "client too slow: 4 outputs unread (--max-pending-outputs); request aborted"
    )
