"""--api-key (Bearer on /v1/*, else 401) and --max-waiting (503 + Retry-After), real server."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from e2e_helpers import TINY_ARGS, TINY_NAME, assert_error, engine_stats, wait_for

KEY = "sk-test-key"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def guarded(launch_server, tiny_model: str):
    """Auth on, one sequence at a time and at most one waiting request."""
    args = list(TINY_ARGS)
    args[args.index("--max-num-seqs") + 1] = "1"
    return launch_server([*args, "--max-waiting", "1"], env={"TOKENMILL_API_KEY": KEY},
                         model=tiny_model)  # fmt: skip


def test_key_required_on_every_route_but_probes(guarded) -> None:
    url = guarded.url
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):  # fmt: skip
        resp = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
        assert assert_error(resp, 401)["code"] == "invalid_api_key"
    assert_error(httpx.get(f"{url}/v1/models", timeout=30), 401)
    ok = httpx.post(
        f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    # the openai client sends the key; operational routes stay open
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == [TINY_NAME]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 200
    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path, body in (
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("POST", "/detokenize", {"tokens": [1, 2]}),
        ("GET", "/stats", None),
        ("GET", "/docs", None),
        ("GET", "/redoc", None),
        ("GET", "/openapi.json", None),
        ("GET", "/no-such-route", None),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        ),
    ):
        resp = httpx.request(method, f"{url}{path}", json=body, timeout=30)
        assert assert_error(resp, 401)["code"] == "invalid_api_key", path
        ok = httpx.request(method, f"{url}{path}", json=body, headers=auth, timeout=30)
        assert ok.status_code == (404 if path == "/no-such-route" else 200), (path, ok.text)
    assert KEY not in guarded.log()  # the key is never logged
    assert guarded.healthy()


def test_503_with_retry_after_past_max_waiting(guarded) -> None:
    url, auth = guarded.url, {"Authorization": f"Bearer {KEY}"}
    wait_for(lambda: engine_stats(url, KEY)["num_running"] == 0, 30, "an idle engine")
    body = {"prompt": "long", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    stop = threading.Event()

    def hold() -> None:
        """A stream that the test closes once it has seen the 503."""
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth,
                          timeout=60) as resp:  # fmt: skip
            for _ in resp.iter_lines():
                if stop.is_set():
                    return

    running = threading.Thread(target=hold)
    running.start()
    wait_for(lambda: engine_stats(url, KEY)["num_running"] == 1, 30, "the first request to run")
    waiting = threading.Thread(target=hold)
    waiting.start()
    wait_for(lambda: engine_stats(url, KEY)["num_waiting"] == 1, 30, "the second request to wait")
    try:
        resp = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                          headers=auth, timeout=30)  # fmt: skip
        err = assert_error(resp, 503)
        assert resp.headers["Retry-After"] == "1" and "max_waiting 1" in err["message"]
        assert guarded.healthy()
    finally:
        stop.set()
        running.join(60)
        waiting.join(60)
    wait_for(lambda: engine_stats(url, KEY)["num_running"] == 0, 30, "the streams to be aborted")
    resp = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                      headers=auth, timeout=30)  # fmt: skip
    assert resp.status_code == 200


def test_admission_counts_sequences_atomically_and_streams_start_at_once(guarded) -> None:
    """--max-waiting 1 with one running stream: a queued stream gets its headers before any
    token; of 12 concurrent requests exactly one more may wait; n=2 can never fit."""
    url, auth = guarded.url, {"Authorization": f"Bearer {KEY}"}
    wait_for(lambda: engine_stats(url, KEY)["num_running"] == 0, 30, "an idle engine")
    resp = httpx.post(f"{url}/v1/completions", headers=auth, timeout=30,
                      json={"prompt": "x", "max_tokens": 1, "n": 2})  # fmt: skip
    assert assert_error(resp, 400, "n")["code"] == "too_many_sequences"
    long = {"prompt": "long", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.Client(headers=auth, timeout=60) as http:
        with http.stream("POST", f"{url}/v1/completions", json=long) as first:
            assert first.status_code == 200
            wait_for(lambda: engine_stats(url, KEY)["num_running"] == 1, 30, "one running")
            with http.stream("POST", f"{url}/v1/completions", json=long) as queued:
                assert queued.status_code == 200  # headers came while it waits for a slot
                assert engine_stats(url, KEY)["num_waiting"] == 1
                assert "text/event-stream" in queued.headers["content-type"]
            wait_for(lambda: engine_stats(url, KEY)["num_waiting"] == 0, 30, "the abort")

            statuses: list[int] = []
            hold = threading.Event()

            def one() -> None:
                with httpx.stream("POST", f"{url}/v1/completions", json=long, headers=auth,
                                  timeout=60) as resp:  # fmt: skip
                    statuses.append(resp.status_code)
                    if resp.status_code == 200:
                        hold.wait(30)

            threads = [threading.Thread(target=one) for _ in range(12)]
            for t in threads:
                t.start()
            wait_for(lambda: len(statuses) == 12, 60, "12 answers")
            assert sorted(statuses) == [200] + [503] * 11, statuses
            hold.set()
            for t in threads:
                t.join(60)
    wait_for(lambda: engine_stats(url, KEY)["num_running"] == 0, 30, "the streams to end")
