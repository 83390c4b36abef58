"""The request contract server/ builds and reads, re-exported from model/ (server never imports
model/): SamplingParams and its constraint spec going in, TokenLogprob coming out."""

from model.inputs import TokenLogprob
from model.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams

__all__ = ["MAX_LOGPROBS", "SamplingParams", "StructuredOutputsParams", "TokenLogprob"]
