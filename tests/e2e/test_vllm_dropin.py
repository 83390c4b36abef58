"""vLLM habits on real servers: a repo id from the HF cache, several names, generation-config
defaults, CORS, a root path, request logs, cached_tokens, timings, TLS."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from e2e_helpers import TINY_ARGS

from tests.conftest import build_hf_cache
from tests.e2e.conftest import REPO, STARTUP_TIMEOUT_S, ServerProcess, free_port

pytestmark = pytest.mark.timeout(120)

REPO_ID = "tokenmill-test/tiny-chat"
TOKENIZER_ID = "tokenmill-test/tiny-tokenizer"
NAMES = ("tiny-a", "alias-b")
API_KEY = "sk-dropin"
GOOD, EVIL = "https://good.example", "https://evil.example"
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.0,
                     "max_new_tokens": 5}  # fmt: skip
SECRET = "SECRET-PROMPT-0123456789"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> Path:
    """A Hugging Face cache with the tiny model (no tokenizer files, its own generation config)
    and, as a second repo, its tokenizer."""
    root = tmp_path_factory.mktemp("hf_home")
    model_src, tok_src = root / "model_src", root / "tok_src"
    model_src.mkdir()
    tok_src.mkdir()
    for f in Path(tiny_model).iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            (model_src / f.name).symlink_to(f)
        elif f.name != "generation_config.json":
            (tok_src / f.name).symlink_to(f)
    (model_src / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    build_hf_cache(root, REPO_ID, model_src)
    build_hf_cache(root, TOKENIZER_ID, tok_src, commit="b" * 40)
    return root


@pytest.fixture(scope="module")
def dropin(launch_server, hf_home: Path) -> ServerProcess:
    args = [
        "--tokenizer", TOKENIZER_ID, "--served-model-name", *NAMES, "--api-key", API_KEY,
        "--max-model-len", "512", "--kv-cache-memory", "16MiB", "--log-level", "info",
        "--allowed-origins", json.dumps([GOOD]), "--root-path", "/api",
        "--enable-log-requests", "--max-log-len", "12",
    ]  # fmt: skip
    return launch_server(args, env={"HF_HOME": str(hf_home)}, model=REPO_ID)


def sdk(server: ServerProcess, base: str = "/api/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + base, api_key=API_KEY, max_retries=0, timeout=60)


def post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def test_repo_id_tokenizer_and_every_name(dropin: ServerProcess) -> None:
    client = sdk(dropin)
    cards = client.models.list().data
    assert [c.id for c in cards] == list(NAMES)
    assert all(c.model_extra["root"] == REPO_ID for c in cards)
    for name in NAMES:
        assert client.models.retrieve(name).id == name
        out = client.completions.create(model=name, prompt="Hello", max_tokens=2,
                                        extra_body={"ignore_eos": True})  # fmt: skip
        assert out.usage.completion_tokens == 2 and out.model == name  # echoed, as vLLM does
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    raw = httpx.get(
        dropin.url + "/v1/models/org/unknown", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert raw.status_code == 404
    assert raw.json() == {"error": {"message": "The model `org/unknown` does not exist",
                                    "type": "invalid_request_error", "param": None,
                                    "code": "model_not_found"}}  # fmt: skip
    with pytest.raises(openai.NotFoundError, match="tiny-a"):
        client.completions.create(model="gpt-4", prompt="Hello", max_tokens=2)


def test_generation_config_defaults_apply_when_omitted(dropin: ServerProcess) -> None:
    client = sdk(dropin)
    messages = [{"role": "user", "content": "Tell me a story."}]

    def chat(**kw):
        return client.chat.completions.create(
            model=NAMES[0], messages=messages, extra_body={"ignore_eos": True}, **kw
        )

    first, second = chat(), chat()  # max_new_tokens 5 and temperature 0 from the checkpoint
    assert first.usage.completion_tokens == 5 and first.choices[0].finish_reason == "length"
    assert first.choices[0].message.content == second.choices[0].message.content
    hot = chat(temperature=1.5, n=4, max_tokens=6)  # the request's values win
    assert hot.usage.completion_tokens == 24
    assert len({c.message.content for c in hot.choices}) > 1
    log = dropin.log()
    assert log.count("default sampling parameters from the model's generation config") == 1
    assert "'temperature': 0.0" in log and "'max_tokens': 5" in log


def test_cors_preflight_allowed_and_refused_origin(dropin: ServerProcess) -> None:
    def preflight(origin: str) -> httpx.Response:
        headers = {"Origin": origin, "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
        return httpx.options(dropin.url + "/api/v1/chat/completions", headers=headers)

    ok = preflight(GOOD)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == GOOD
    assert "POST" in ok.headers["access-control-allow-methods"]
    refused = preflight(EVIL)
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    # A simple request: the allowed origin may read the answer (even a 401), the other not.
    for origin, allowed in ((GOOD, True), (EVIL, False)):
        r = httpx.get(dropin.url + "/v1/models", headers={"Origin": origin})
        assert r.status_code == 401
        assert (r.headers.get("access-control-allow-origin") == GOOD) is allowed


def test_root_path_sdk_auth_and_openapi(dropin: ServerProcess) -> None:
    # A proxy that forwards /api/... as is (the SDK talks to /api/v1), and one that strips it.
    for base in ("/api/v1", "/v1"):
        stream = sdk(dropin, base).chat.completions.create(
            model=NAMES[1], messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
            stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = list(stream)
        assert any(c.choices and c.choices[0].delta.content is not None for c in chunks)
        assert {c.model for c in chunks} == {NAMES[1]}
    for path in ("/api/v1/models", "/v1/models", "/api/v1/models/tiny-a"):
        assert httpx.get(dropin.url + path).status_code == 401, path  # the key check holds
    assert httpx.get(dropin.url + "/api/openapi.json").status_code == 401  # the docs too
    auth = {"Authorization": f"Bearer {API_KEY}"}
    spec = httpx.get(dropin.url + "/api/openapi.json", headers=auth).json()
    assert spec["servers"] == [{"url": "/api"}]
    assert httpx.get(dropin.url + "/apix/v1/models", headers=auth).status_code == 404


def test_request_log_cut_to_max_log_len(dropin: ServerProcess) -> None:
    r = post(dropin, "/v1/completions", {"model": NAMES[0], "prompt": SECRET, "max_tokens": 1})
    assert r.status_code == 200
    log = dropin.log()
    assert f"Received request {r.json()['id']}: prompt: '{SECRET[:12]}'" in log
    assert SECRET[:13] not in log


def _long_prompt(tag: str) -> str:
    return f"{tag}: " + " ".join(f"w{i}" for i in range(60))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_cached_tokens_count_prefix_hits(dropin: ServerProcess, endpoint: str, stream: bool):
    prompt = _long_prompt(f"{endpoint}-{stream}")
    body: dict = {"model": NAMES[0], "max_tokens": 2, "ignore_eos": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"

    def usage() -> dict:
        r = post(dropin, path, body)
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()["usage"]
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: {")]
        return json.loads(events[-1])["usage"]

    cold, warm = usage(), usage()
    n = cold["prompt_tokens"]
    assert n > 64
    # Completions: a new prompt has no hit; chats share the template's system-prompt blocks.
    cold_hits = cold["prompt_tokens_details"]["cached_tokens"]
    assert cold_hits == 0 if endpoint == "completions" else 0 <= cold_hits <= 32
    # Every full block of 16 but the one holding the last prompt token (always computed).
    assert warm["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 16 * 16}


def test_timings_only_when_asked(dropin: ServerProcess) -> None:
    body = {"model": NAMES[0], "prompt": _long_prompt("timings"), "max_tokens": 4,
            "ignore_eos": True}  # fmt: skip
    plain = post(dropin, "/v1/completions", body).json()
    assert "timings" not in plain
    timed = post(dropin, "/v1/completions", body | {"timings_per_token": True}).json()
    t, usage = timed["timings"], timed["usage"]
    assert t["predicted_n"] == 4 and t["cache_n"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert t["prompt_n"] + t["cache_n"] == usage["prompt_tokens"]
    assert t["queue_ms"] >= 0 and t["prompt_ms"] > 0 and t["predicted_ms"] > 0
    assert t["predicted_per_second"] == pytest.approx(3 * 1000 / t["predicted_ms"])
    assert t["prompt_per_second"] == pytest.approx(t["prompt_n"] * 1000 / t["prompt_ms"])
    body = {"model": NAMES[0], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "ignore_eos": True, "stream": True, "timings_per_token": True}  # fmt: skip
    r = post(dropin, "/v1/chat/completions", body)
    chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    assert all("timings" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["timings"]["predicted_n"] == 3
    bad = post(dropin, "/v1/completions", body | {"timings_per_token": "yes"})
    assert bad.status_code == 400 and "timings_per_token" in bad.json()["error"]["param"]


def test_http_duration_histogram_and_access_log(dropin: ServerProcess) -> None:
    assert post(dropin, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}).status_code == 200
    text = httpx.get(dropin.url + "/metrics").text
    line = next(
        ln for ln in text.splitlines()
        if ln.startswith("tokenmill_http_request_duration_seconds_count")
        and 'route="/v1/completions"' in ln and 'status="200"' in ln
    )  # fmt: skip
    assert float(line.rsplit(" ", 1)[1]) >= 1
    assert '"GET /health HTTP/1.1" 200' in dropin.log()  # uvicorn's access log is on by default


# --- TLS, with a self-signed certificate made here -----------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return key, cert


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


@pytest.fixture(scope="module")
def tls_server(tiny_model: str, certificate, tmp_path_factory) -> ServerProcess:
    key, cert = certificate
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", tiny_model, *TINY_ARGS,
           "--log-level", "info", "--disable-uvicorn-access-log", "--disable-log-stats",
           "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log_path = tmp_path_factory.mktemp("tls_server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "TOKENMILL_API_KEY"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, f"https://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"TLS server did not start:\n{server.log()[-4000:]}")
            try:
                if httpx.get(server.url + "/health", verify=trusting(cert), timeout=5).is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)  # poll interval, bounded by the deadline
        yield server
    finally:
        server.stop()


def test_https_with_a_self_signed_certificate(tls_server: ServerProcess, certificate) -> None:
    _, cert = certificate
    # NOTE: closed after use: an open keep-alive connection holds up the server's exit
    with httpx.Client(verify=trusting(cert), timeout=60) as http:
        client = openai.OpenAI(base_url=tls_server.url + "/v1", api_key="unused", max_retries=0,
                               http_client=http)  # fmt: skip
        out = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": SECRET}], max_tokens=3,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    assert out.usage.completion_tokens == 3
    assert "https://127.0.0.1" in tls_server.log()  # the ready line names the scheme
    with pytest.raises(httpx.HTTPError):  # the default trust store does not know our CA
        httpx.get(tls_server.url + "/health", timeout=10)
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the TLS port
        httpx.get(tls_server.url.replace("https", "http") + "/health", timeout=10)
    log = tls_server.log()
    assert "GET /health" not in log  # --disable-uvicorn-access-log
    assert SECRET[:6] not in log  # prompts are never logged unless asked
