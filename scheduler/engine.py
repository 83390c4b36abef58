"""LLMEngine: add_request / step / abort_request on one thread; each step is schedule → execute →
update → process (scheduler/output_processor.py turns sampled tokens into RequestOutput deltas)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import fields, replace
from typing import NoReturn

from model.constraints import ConstraintCompiler
from model.detokenizer import IncrementalDetokenizer
from model.executor import make_executor
from model.generation_config import generation_defaults
from model.pooler import PoolerConfig, load_pooler_config
from model.rendezvous import ParallelConfig
from model.runner import ModelRunner
from model.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams
from model.tokenizer import load_tokenizer
from scheduler.block_manager import BlockManager
from scheduler.config import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    EngineConfig,
    parse_size,
    resolve_model,
    served_model_name,
)
from scheduler.errors import EngineFatalError, PromptTooLongError, fit_max_tokens
from scheduler.output_processor import OutputProcessor, Request
from scheduler.outputs import RequestMetrics, RequestOutput, SchedulerStats
from scheduler.scheduler import Scheduler
from scheduler.sequence import Sequence, SequenceStatus
from scheduler.spec_decode import SPEC_MAX_ROWS, DraftModel, SpeculativeConfig

logger = logging.getLogger(__name__)


# Errors after which the device cannot be trusted again (a later step would fail or be wrong).
FATAL_MARKERS = ("CUDA error", "device-side assert", "NCCL error", "CUBLAS_STATUS")


class LLMEngine:
    """One model, one scheduler; `add_request`/`abort_request` are safe to call from any thread."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = path = resolve_model(config.model, config.revision, config.download_dir)
        self.executor = make_executor(path, runner_kwargs(config), parallel_config(config))
        tok = path
        if config.tokenizer is not None:
            tok = resolve_model(config.tokenizer, config.tokenizer_revision, config.download_dir)
        self.tokenizer = load_tokenizer(tok)
        self.default_sampling_params = self._generation_defaults(path)
        self.pooler_config: PoolerConfig | None = None  # set: --runner pooling
        if config.runner == "pooling":
            self.pooler_config = load_pooler_config(path, config.pooler_config)
            logger.info("pooling runner: %s", self.pooler_config)
        self.model_config = self.executor.model_config
        self.max_model_len: int = self.executor.max_model_len
        self.model_name = served_model_name(config.model, config.served_model_name)
        spec = config.speculative_config
        spec = None if spec is None else SpeculativeConfig.from_dict(spec)
        self.draft_model = None
        if spec is not None and spec.method == "draft_model":
            kwargs = runner_kwargs(config) | {"max_model_len": self.executor.max_model_len}
            if kwargs["kv_cache_memory"]:  # NOTE: per rank; the draft's one rank holds all heads
                kwargs["kv_cache_memory"] *= config.tensor_parallel_size
            path = resolve_model(spec.model, None, config.download_dir)
            self.draft_model = DraftModel.load(path, kwargs, self.executor.model_config)
        num_blocks = self.executor.num_kv_blocks
        if self.draft_model is not None:  # NOTE: one block id names a block in both caches
            num_blocks = min(num_blocks, self.draft_model.runner.num_kv_blocks)
        device = "cpu" if self.runner.device.type == "cpu" else "cuda"
        # CPU: KV pages become resident as blocks are written; keep RSS near the working set
        floor = num_blocks // 8 if device == "cpu" else None
        window = self.model_config.sliding_window  # freeing needs every layer windowed
        self.block_manager = BlockManager(
            num_blocks,
            self.executor.block_size,
            config.enable_prefix_caching,
            floor,
            sliding_window=window if self.model_config.all_layers_sliding else None,
        )
        self.max_num_seqs: int = config.max_num_seqs or DEFAULT_MAX_NUM_SEQS[device]
        self.max_num_batched_tokens: int = (
            config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS[device]
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=self.tokenizer.eos_token_ids,
            speculative_config=spec,
            spec_max_rows=SPEC_MAX_ROWS[device],
            draft_model=self.draft_model,
        )
        if spec is not None:
            logger.info("speculative decoding: %s", spec)
        self.constraints: ConstraintCompiler | None = None  # made by the first constrained request
        self.output_processor = OutputProcessor(self.tokenizer, self.scheduler)
        self._lock = threading.Lock()  # guards the two inboxes below (filled from other threads)
        self._new: list[Request] = []
        self._aborts: list[tuple[str, str | None]] = []  # (request id, error or None)
        self._last_step = SchedulerStats()
        self.num_steps = 0
        self.model_steps: dict[str, int] = {}  # steps by the path that served them (runner)

    def _generation_defaults(self, path: str) -> dict:
        """Request defaults from generation_config.json, validated now and logged once."""
        cfg = self.config
        defaults = generation_defaults(cfg.generation_config, path, cfg.override_generation_config)
        try:
            SamplingParams(**defaults)
        except (TypeError, SamplingParamsError) as e:
            raise ValueError(f"generation config defaults {defaults} are invalid: {e}") from None
        if defaults:
            logger.warning(
                "default sampling parameters from the model's generation config (used when a "
                "request omits them; --generation-config vllm to ignore it): %s",
                defaults,
            )
        return defaults

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None,
        arrival_time: float | None = None,
    ) -> None:
        """Validate and queue a request; it joins the scheduler at the next step. `params` None:
        a pooling request (--runner pooling), whose one output carries the embedding."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if (params is None) != (self.pooler_config is not None):
            raise SamplingParamsError(
                "this model is served with --runner pooling: it embeds, it does not generate"
                if params is not None
                else "pooling needs a model served with --runner pooling",
                "model",
            )
        if params is None:
            return self._add_pooling_request(request_id, ids, arrival_time)
        max_tokens = self._validate(ids, params)
        spec = params.structured_outputs
        compiler = self._constraint_compiler() if spec is not None else None
        metrics = RequestMetrics(arrival_time if arrival_time is not None else time.monotonic())
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(request_id, list(ids), params, sample_index=i, max_tokens=max_tokens)
            seq.leader = seqs[0] if seqs else None
            if compiler is not None:
                seq.matcher = compiler.matcher(spec)
            seq.metrics = metrics
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            seqs.append(seq)
        self._queue(Request(request_id, ids, seqs, metrics))

    def _add_pooling_request(
        self, request_id: str, ids: list[int], arrival_time: float | None
    ) -> None:
        """One prefill-only sequence that pools its hidden states instead of sampling."""
        self._validate(ids, SamplingParams(max_tokens=None), pooling=True)
        metrics = RequestMetrics(arrival_time if arrival_time is not None else time.monotonic())
        seq = Sequence(request_id, list(ids), SamplingParams(max_tokens=None), max_tokens=0)
        seq.pooler, seq.metrics = self.pooler_config, metrics
        self._queue(Request(request_id, ids, [seq], metrics))

    def _queue(self, req: Request) -> None:
        with self._lock:
            rid = req.request_id
            if rid in self.requests or any(r.request_id == rid for r in self._new):
                raise ValueError(f"request id {rid!r} is already running")
            self._new.append(req)

    def warm_up_constraints(self) -> None:
        """Build llguidance's tokenizer now (~0.7 s, at start-up): it holds the GIL for ~0.4 s at
        a stretch, which no thread could hide from a serving event loop. A tokenizer it cannot
        take fails constrained requests later, with the same error."""
        try:
            self._constraint_compiler().warm_up()
        except Exception as e:  # noqa: BLE001 - reported again by each constrained request
            logger.warning("structured outputs will fail: %s: %s", type(e).__name__, e)

    def compile_constraint(self, spec: StructuredOutputsParams) -> Future:
        """Compile `spec` on the compiler's own thread; add_request then finds it cached."""
        return self._constraint_compiler().compile_async(spec)

    def _constraint_compiler(self) -> ConstraintCompiler:
        with self._lock:
            if self.constraints is None:
                self.constraints = ConstraintCompiler(
                    self.tokenizer.hf,
                    self.model_config.vocab_size,
                    self.tokenizer.eos_token_ids,
                    fill_during_forward=self.runner.device.type != "cpu",  # a GPU leaves it idle
                )
            return self.constraints

    def _validate(self, ids: list[int], params: SamplingParams, pooling: bool = False) -> int:
        """Returns the effective max_tokens (fit_max_tokens: None is the rest of the context);
        a pooling prompt only has to fit in max_model_len."""
        if not ids:
            raise SamplingParamsError("prompt is empty: at least 1 token is needed", "prompt")
        vocab = self.model_config.vocab_size
        for name, token_ids in (
            ("prompt", ids),
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", list(params.logit_bias or ())),
        ):
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise SamplingParamsError(
                    f"{name} token id {bad[0]} is out of vocabulary [0, {vocab})", name
                )
        if pooling:
            if len(ids) > self.max_model_len:
                raise PromptTooLongError(
                    f"input has {len(ids)} tokens > max_model_len {self.max_model_len}", "input"
                )
            return 0
        return fit_max_tokens(
            len(ids), params.max_tokens, self.max_model_len, min_tokens=params.min_tokens
        )

    def abort_request(self, request_id: str, error: str | None = None) -> None:
        """Mark for abort; the next step frees its blocks and reports finish_reason "abort"
        (with `error` on the final output when the server cut the request off)."""
        with self._lock:
            self._aborts.append((request_id, error))

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self.requests or self._new or self._aborts)

    def num_waiting(self) -> int:
        """Sequences not yet running: queued in the scheduler or not yet admitted (n each)."""
        with self._lock:
            new = sum(len(r.seqs) for r in self._new)
        return len(self.scheduler.waiting) + new

    def step(self) -> list[RequestOutput]:
        """Admit new requests, apply aborts, run one scheduled batch, return this step's deltas."""
        t0 = time.perf_counter()
        with self._lock:
            new, self._new = self._new, []
            aborts, self._aborts = self._aborts, []
        for req in new:
            self.output_processor.add(req)
            for seq in req.seqs:
                self.scheduler.add(seq)
        outputs = [
            out
            for rid, err in aborts
            if (out := self.output_processor.finish_request(rid, error=err)) is not None
        ]
        if self.constraints is not None and self.scheduler.speculative_config is not None:
            self.constraints.settle()  # NOTE: drafts are checked against the matchers it reads
        batch = self.scheduler.schedule()
        t1 = time.perf_counter()
        split = {"schedule": t1 - t0, "execute": 0.0, "update": 0.0, "detokenize": 0.0}
        gaps: list[float] = []
        if batch is not None:
            self.num_steps += 1
            now = time.monotonic()
            for seq in batch.seqs:
                if seq.metrics.first_scheduled_time is None:
                    seq.metrics.first_scheduled_time = now
            constraints = None
            drafts = sum(len(s.draft_token_ids) for s in batch.seqs)
            generated = self.output_processor.generation_tokens_total
            try:
                if self.constraints is not None:  # NOTE: unconstrained servers skip even this
                    constraints = self.constraints.batch(batch.row_matchers())
                step_output = self.executor.execute(batch.step_input, constraints)
                if self.draft_model is not None:
                    self.draft_model.run_step(batch.step_input)
                path = self.executor.last_path
                self.model_steps[path] = self.model_steps.get(path, 0) + 1
                t2 = time.perf_counter()
                sampled = self.scheduler.update(batch, step_output)
                pooled = [s for s in batch.pooling_seqs if s.is_finished]
                if constraints is not None:  # the next step's masks, filled while this one ends
                    self.constraints.prefetch([s.matcher for s in batch.sampling_seqs])
                t3 = time.perf_counter()
                outputs.extend(self.output_processor.process(sampled, gaps))
                outputs.extend(self.output_processor.process_pooled(pooled))
                t4 = time.perf_counter()
            except Exception as exc:
                outputs.extend(self._fail_step(batch.seqs, exc))
                t2 = t3 = t4 = time.perf_counter()
            split.update(execute=t2 - t1, update=t3 - t2, detokenize=t4 - t3)
            split.update(self.executor.last_timings)  # prepare / forward / sample (+ comm under TP)
            gate = self.scheduler.spec_gate
            if gate is not None and batch.step_input.num_tokens - drafts == len(batch.seqs):
                generated = self.output_processor.generation_tokens_total - generated
                gate.observe(drafts > 0, generated, time.perf_counter() - t0)
            if constraints is not None:
                split["mask"] = constraints.fill_time
                split["mask_wait"] = constraints.wait_time  # of it, on the step's critical path
        self._last_step = SchedulerStats(
            step_duration=time.perf_counter() - t0,
            step_num_seqs=len(batch.seqs) if batch else 0,
            step_num_tokens=batch.step_input.num_tokens if batch else 0,
            step_time_split=split,
            step_inter_token_latencies=gaps,
            step_acceptance_lengths=self.scheduler.acceptance_lengths,
        )
        self.scheduler.acceptance_lengths = []
        return outputs

    def _fail_step(self, seqs: list[Sequence], exc: Exception) -> list[RequestOutput]:
        """A step raised: end only the requests it ran (finish_reason "error", blocks freed) and
        keep serving the rest, unless a worker died or the device is broken (re-raised)."""
        if not self.executor.is_healthy():
            raise EngineFatalError(f"engine step failed: {self.executor.dead_reason}") from exc
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        # NOTE: no "N failures in a row" rule: N bad requests in a row would kill the server
        if any(marker in str(exc) for marker in FATAL_MARKERS):
            raise EngineFatalError(message) from exc
        logger.exception("%s; failing the %d sequences of this step", message, len(seqs))
        # a request that finished inside the failed step lost its output: report it failed
        return [
            self.output_processor.finish_request(rid, SequenceStatus.FINISHED_ERROR, message)
            or RequestOutput.failed(rid, message)
            for rid in dict.fromkeys(seq.request_id for seq in seqs)
        ]

    def fail_all(self, error: str) -> list[RequestOutput]:
        """After a failed step: finish every request with finish_reason "error" and free blocks."""
        with self._lock:
            new, self._new = self._new, []
            self._aborts = []
        for req in new:
            self.requests[req.request_id] = req
        outputs = []
        for rid in list(self.requests):
            try:
                out = self.output_processor.finish_request(
                    rid, SequenceStatus.FINISHED_ERROR, error
                )
            except Exception:  # the pool may be inconsistent after the failure: still report
                logger.exception("could not free request %s", rid)
                self.requests.pop(rid, None)
                out = None
            outputs.append(out or RequestOutput.failed(rid, error))
        return outputs

    def get_stats(self) -> SchedulerStats:
        """Pool and queue state now, plus the timing of the last step."""
        bm, spec = self.block_manager, self.scheduler.spec_stats
        return replace(
            self._last_step,
            num_running=len(self.scheduler.running),
            num_waiting=self.num_waiting(),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_total_blocks,
            kv_cache_usage=bm.usage,
            num_preemptions_total=self.scheduler.num_preemptions,
            prefix_cache_queries_total=bm.prefix_queries,
            prefix_cache_hits_total=bm.prefix_hits,
            num_steps_total=self.num_steps,
            model_steps_total=dict(self.model_steps),
            prompt_tokens_total=self.output_processor.prompt_tokens_total,
            generation_tokens_total=self.output_processor.generation_tokens_total,
            spec_decode_num_drafts_total=spec.num_drafts,
            spec_decode_num_draft_tokens_total=spec.num_draft_tokens,
            spec_decode_num_accepted_tokens_total=spec.num_accepted_tokens,
        )

    def is_healthy(self) -> bool:
        """False once a tensor-parallel worker died (see `dead_reason`)."""
        return self.executor.is_healthy()

    @property
    def dead_reason(self) -> str | None:
        return self.executor.dead_reason

    @property
    def requests(self) -> dict[str, Request]:
        """The requests in flight, by id (the output processor finishes them)."""
        return self.output_processor.requests

    @property
    def runner(self) -> ModelRunner:
        """This process's rank (rank 0): for tests and diagnostics; steps go through executor."""
        return self.executor.runner

    def shutdown(self) -> None:
        if self.draft_model is not None:
            self.draft_model.runner.shutdown()
        if self.constraints is not None:
            self.constraints.shutdown()
        self.executor.shutdown()


def runner_kwargs(config: EngineConfig) -> dict:
    """The ModelRunner keywords every rank builds its shard with."""
    return dict(
        dtype=config.dtype,
        device=config.device,
        block_size=config.block_size,
        kv_cache_memory=parse_size(config.kv_cache_memory),
        max_model_len=config.max_model_len,
        max_num_batched_tokens=config.max_num_batched_tokens,
        seed=config.seed,
        quantization=config.quantization,
        kv_cache_dtype=config.kv_cache_dtype,
        enforce_eager=config.enforce_eager,
        activation_dtype=config.activation_dtype,
        runner=config.runner,
    )


def parallel_config(config: EngineConfig) -> ParallelConfig:
    """EngineConfig names ParallelConfig's fields as they are."""
    return ParallelConfig(**{f.name: getattr(config, f.name) for f in fields(ParallelConfig)})


def run_worker(config: EngineConfig) -> NoReturn:
    """`tokenmill worker`: this host's ranks of the head's engine (no scheduler, no HTTP); exits
    the process (0: stopped by the head, 1: the head or a rank lost, or start-up failed)."""
    from model.worker import run_node

    path = resolve_model(config.model, config.revision, config.download_dir)
    return run_node(path, runner_kwargs(config), parallel_config(config))
