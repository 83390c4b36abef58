"""OpenAIServing.log_request: a huge prompt is neither decoded nor logged whole."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from scheduler import SamplingParams
from server.config import ServerConfig
from server.offload import Offload
from server.serving_engine import DEFAULT_MAX_LOG_LEN, OpenAIServing

pytestmark = pytest.mark.timeout(10)


class SpyTokenizer:
    def __init__(self) -> None:
        self.decoded: list[int] = []  # how many ids each decode got

    def decode(self, ids: list[int]) -> str:
        self.decoded.append(len(ids))
        return "ab" * len(ids)


def serving(max_log_len: int | None) -> tuple[OpenAIServing, SpyTokenizer]:
    tok = SpyTokenizer()
    engine = SimpleNamespace(tokenizer=tok, model_name="m", default_sampling_params={})
    config = ServerConfig(enable_log_requests=True, max_log_len=max_log_len)
    return OpenAIServing(engine, config, Offload(1)), tok


@pytest.mark.parametrize(("max_log_len", "cut"), [(None, DEFAULT_MAX_LOG_LEN), (10, 10)])
def test_log_request_decodes_and_logs_a_bounded_prefix(caplog, max_log_len, cut) -> None:
    s, tok = serving(max_log_len)
    prompt = list(range(1_000_000))
    with caplog.at_level(logging.INFO, logger="server.serving_engine"):
        s.log_request("cmpl-1", [prompt], [SamplingParams()])
    assert tok.decoded == [cut]
    (record,) = caplog.records
    assert record.args[1] == ("ab" * cut)[:cut]
    assert record.args[3] == list(range(cut))
    assert len(record.getMessage()) < 20 * cut + 2000
