"""LLM: offline batch generation on top of LLMEngine (vLLM's `LLM.generate`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

from model.inputs import TokenLogprob
from model.sampling_params import SamplingParams
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from scheduler.outputs import RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)

Prompt = str | list[int]


@dataclass(slots=True)
class GeneratedSample:
    """One sample's cumulative result (the deltas of every step joined)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[GeneratedSample]
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = None


def _as_prompt_list(prompts: Prompt | SequenceABC[Prompt]) -> list[Prompt]:
    """A str or one list of ints is a single prompt; anything else is a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]
    return prompts


class LLM:
    """`LLM(model=None, **engine_kwargs)`: every EngineConfig field is a keyword."""

    def __init__(self, model: str | None = None, **engine_kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation-config defaults (vLLM's LLM method)."""
        return SamplingParams(**self.engine.default_sampling_params)

    def generate(
        self,
        prompts: Prompt | SequenceABC[Prompt],
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Run every prompt to completion together; results in prompt order."""
        plist = _as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or self.get_default_sampling_params()] * len(plist)
        else:
            param_list = list(params)
            if len(param_list) != len(plist):
                raise ValueError(f"got {len(plist)} prompts but {len(param_list)} sampling params")
        results: dict[str, GenerationResult] = {}
        order = []
        try:
            for prompt, p in zip(plist, param_list, strict=True):
                rid = f"llm-{self._counter}"
                self._counter += 1
                self.engine.add_request(rid, prompt, p)
                order.append(rid)
                results[rid] = GenerationResult(
                    rid,
                    [],
                    [
                        GeneratedSample(i, logprobs=[] if p.logprobs is not None else None)
                        for i in range(p.n)
                    ],
                )
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    self._accumulate(results[out.request_id], out)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            with contextlib.suppress(Exception):
                self.engine.step()  # frees the aborted requests' blocks
            raise
        return [results[rid] for rid in order]

    @staticmethod
    def _accumulate(result: GenerationResult, out: RequestOutput) -> None:
        result.prompt_token_ids = out.prompt_token_ids
        result.num_cached_tokens = out.num_cached_tokens
        result.metrics = out.metrics
        result.error = out.error or result.error
        for delta in out.outputs:
            sample = result.outputs[delta.index]
            sample.text += delta.text
            sample.token_ids.extend(delta.token_ids)
            if delta.logprobs is not None and sample.logprobs is not None:
                sample.logprobs.extend(delta.logprobs)
            sample.finish_reason = delta.finish_reason
            sample.stop_reason = delta.stop_reason

    def shutdown(self) -> None:
        self.engine.shutdown()
