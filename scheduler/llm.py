"""LLM: offline batch generation on top of LLMEngine (vLLM's `LLM.generate`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence as SequenceABC

from model.sampling_params import SamplingParams
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from scheduler.outputs import CompletionOutput, RequestOutput

Prompt = str | list[int]


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
    ) -> list[RequestOutput]:
        """Run every prompt to completion together; cumulative outputs, in prompt order."""
        plist = [prompts] if isinstance(prompts, str) else list(prompts)
        if plist and all(isinstance(p, int) for p in plist):
            plist = [plist]  # one list of token ids is one prompt
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or self.get_default_sampling_params()] * len(plist)
        else:
            param_list = list(params)
            if len(param_list) != len(plist):
                raise ValueError(f"got {len(plist)} prompts but {len(param_list)} sampling params")
        results: dict[str, RequestOutput] = {}
        try:
            for prompt, p in zip(plist, param_list, strict=True):
                rid = f"llm-{self._counter}"
                self._counter += 1
                self.engine.add_request(rid, prompt, p)
                want = p.logprobs is not None
                samples = [CompletionOutput(i, "", [], [] if want else None, 0) for i in range(p.n)]
                results[rid] = RequestOutput(rid, [], samples, False)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    self._accumulate(results[out.request_id], out)
        except BaseException:
            for rid in results:
                self.engine.abort_request(rid)
            with contextlib.suppress(Exception):
                self.engine.step()  # frees the aborted requests' blocks
            raise
        return list(results.values())

    @staticmethod
    def _accumulate(result: RequestOutput, out: RequestOutput) -> None:
        result.prompt_token_ids = out.prompt_token_ids
        result.finished = out.finished
        result.num_cached_tokens = out.num_cached_tokens
        result.metrics = out.metrics
        result.error = out.error or result.error
        for delta in out.outputs:
            sample = result.outputs[delta.index]
            sample.text += delta.text
            sample.token_ids.extend(delta.token_ids)
            sample.num_tokens = len(sample.token_ids)
            if delta.logprobs is not None and sample.logprobs is not None:
                sample.logprobs.extend(delta.logprobs)
            sample.finish_reason = delta.finish_reason
            sample.stop_reason = delta.stop_reason

    def shutdown(self) -> None:
        self.engine.shutdown()
