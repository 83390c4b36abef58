"""`--runner pooling` on a real server: embeddings equal sentence-transformers' own `encode` on
the same folder (last-token and mean pooling, chunked prefill, prefix-cache hits), the openai
SDK's base64 default, dimensions, rerank and score, and hostile input."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import httpx
import openai
import pytest
import torch
from e2e_helpers import TINY_NAME, assert_error, engine_stats

pytestmark = pytest.mark.timeout(180)

NAME = "emb"
# 16-token steps: longer texts prefill in chunks (MEAN sums across them)
ARGS = ["--runner", "pooling", "--served-model-name", NAME, "--max-model-len", "512",
        "--kv-cache-memory", "16MiB", "--max-num-batched-tokens", "16", "--log-level", "warning",
        "--max-prompts-per-request", "64"]  # fmt: skip
LONG = "Paged attention keeps the key and value cache in fixed-size blocks, " * 3
TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", LONG, LONG + " Again."]


def build_st_folder(out: Path, tokenizer_dir: Path, arch: str, mode: str) -> Path:
    """A random 2-layer decoder saved by sentence-transformers (base model, no LM head) with
    Transformer + Pooling(mode) + Normalize modules."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
                initializer_range=0.1)  # fmt: skip
    base = Qwen2Model(Qwen2Config(**dims)) if arch == "qwen2" else LlamaModel(LlamaConfig(**dims))
    raw = out / "raw"
    base.float().eval().save_pretrained(raw)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # NOTE: sentence-transformers 6 wraps a text in the chat template when the tokenizer has
    # one; /v1/embeddings embeds the text as it is (as vLLM does)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(raw)
    try:  # sentence-transformers 6's home of the modules; before it, `models`
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer
    transformer = Transformer(str(raw))
    dim = getattr(transformer, "get_embedding_dimension", None)
    dim = dim() if dim is not None else transformer.get_word_embedding_dimension()
    folder = out / "st"
    modules = [transformer, Pooling(dim, pooling_mode=mode), Normalize()]
    SentenceTransformer(modules=modules).save(str(folder))
    return folder


@pytest.fixture(scope="module", params=[("qwen2", "lasttoken"), ("llama", "mean")], ids=str)
def st_server(request, tmp_path_factory, smollm2_tokenizer_dir, launch_server):
    """(server, the sentence-transformers model of its folder)."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    arch, mode = request.param
    out = tmp_path_factory.mktemp(f"st_{arch}_{mode}")
    folder = build_st_folder(out, smollm2_tokenizer_dir, arch, mode)
    st = SentenceTransformer(str(folder), device="cpu")
    return launch_server(ARGS, model=str(folder)), st


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def check_close(got: list[list[float]], want: torch.Tensor) -> None:
    got_t = torch.tensor(got, dtype=torch.float32)
    assert got_t.shape == want.shape
    cos = torch.nn.functional.cosine_similarity(got_t, want, dim=-1)
    assert cos.min().item() > 0.9999, cos
    assert (got_t - want).abs().max().item() < 1e-4


def test_embeddings_equal_sentence_transformers(st_server) -> None:
    server, st = st_server
    want = st.encode(TEXTS, convert_to_tensor=True).float()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    resp = client.embeddings.create(model=NAME, input=TEXTS)  # the SDK asks for base64
    assert [d.index for d in resp.data] == [0, 1, 2, 3]
    check_close([d.embedding for d in resp.data], want)
    ids = [st.tokenizer(t)["input_ids"] for t in TEXTS]
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(map(len, ids))
    raw = post(server.url, "/v1/embeddings", {"input": TEXTS[1], "encoding_format": "float"})
    body = raw.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["object"] == "list" and body["model"] == NAME
    check_close([body["data"][0]["embedding"]], want[1:2])
    by_ids = post(server.url, "/v1/embeddings", {"input": ids[2:], "model": NAME}).json()
    check_close([d["embedding"] for d in by_ids["data"]], want[2:])
    one_ids = post(server.url, "/v1/embeddings", {"input": ids[0]}).json()
    check_close([one_ids["data"][0]["embedding"]], want[:1])
    b64 = post(server.url, "/v1/embeddings", {"input": "hello world", "encoding_format": "base64"})
    packed = base64.b64decode(b64.json()["data"][0]["embedding"])
    check_close([list(struct.unpack(f"<{len(packed) // 4}f", packed))], want[:1])


def test_dimensions_truncate_then_renormalize(st_server) -> None:
    server, st = st_server
    want = torch.nn.functional.normalize(st.encode(TEXTS[:2], convert_to_tensor=True)[:, :16])
    body = post(server.url, "/v1/embeddings", {"input": TEXTS[:2], "dimensions": 16}).json()
    check_close([d["embedding"] for d in body["data"]], want.float())


def test_truncate_prompt_tokens_keeps_the_last_tokens(st_server) -> None:
    server, st = st_server
    ids = st.tokenizer(LONG)["input_ids"]
    last = post(server.url, "/v1/embeddings", {"input": ids[-5:]}).json()
    for given in (LONG, [ids]):  # text, and token ids
        body = {"input": given, "truncate_prompt_tokens": 5}
        cut = post(server.url, "/v1/embeddings", body).json()
        assert cut["usage"]["prompt_tokens"] == 5
        check_close([cut["data"][0]["embedding"]], torch.tensor([last["data"][0]["embedding"]]))
    whole = post(
        server.url, "/score", {"text_1": LONG, "text_2": LONG, "truncate_prompt_tokens": -1}
    )
    assert whole.json()["data"][0]["score"] == pytest.approx(1.0, abs=1e-6)


def test_rerank_and_score_are_cosine_similarities(st_server) -> None:
    server, st = st_server
    emb = st.encode(TEXTS, convert_to_tensor=True).float()
    cos = (emb[1:] @ emb[0]).tolist()  # normalized: the dot product is the cosine
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        body = post(server.url, path, {"query": TEXTS[0], "documents": TEXTS[1:], "top_n": 2})
        results = body.json()["results"]
        order = sorted(range(3), key=lambda i: -cos[i])[:2]
        assert [r["index"] for r in results] == order
        assert [r["document"]["text"] for r in results] == [TEXTS[1 + i] for i in order]
        assert [r["relevance_score"] for r in results] == pytest.approx(
            [cos[i] for i in order], abs=1e-4
        )
    score = post(server.url, "/score", {"text_1": TEXTS[0], "text_2": TEXTS[1:]}).json()
    assert [d["index"] for d in score["data"]] == [0, 1, 2]
    assert [d["score"] for d in score["data"]] == pytest.approx(cos, abs=1e-4)
    pairwise = post(server.url, "/v1/score", {"text_1": TEXTS[:2], "text_2": TEXTS[2:]}).json()
    want = [float(emb[0] @ emb[2]), float(emb[1] @ emb[3])]
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(want, abs=1e-4)


def test_pooling_frees_blocks_and_last_token_reuses_the_prefix_cache(st_server) -> None:
    server, st = st_server
    before = engine_stats(server.url)["prefix_cache_hits_total"]
    for _ in range(2):
        assert post(server.url, "/v1/embeddings", {"input": LONG}).status_code == 200
    stats = engine_stats(server.url)
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0.0
    hits = stats["prefix_cache_hits_total"] - before
    mean = "mean" in json.dumps(st[1].get_config_dict())
    assert (hits == 0) if mean else (hits >= 16)  # MEAN reads every position: no hits


HOSTILE = [
    ("/v1/embeddings", {"input": 5}, 400),
    ("/v1/embeddings", {"input": [1.5]}, 400),
    ("/v1/embeddings", {"input": []}, 400),
    ("/v1/embeddings", {"input": [[]]}, 400),
    ("/v1/embeddings", {"input": ""}, 400),
    ("/v1/embeddings", {"input": [[10**12]]}, 400),
    ("/v1/embeddings", {"input": ["x"] * 5000}, 400),
    ("/v1/embeddings", {"input": "word " * 400_000}, 400),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, 400),
    ("/v1/embeddings", {"input": "x", "dimensions": 10_000}, 400),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400),
    ("/v1/embeddings", {"input": "x", "model": "nope"}, 404),
    ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 0}, 400),
    ("/v1/embeddings", {"input": [5] * 600}, 400),  # > max_model_len 512
    ("/v1/rerank", {"query": "q", "documents": []}, 400),
    ("/v1/rerank", {"query": "q", "documents": "d"}, 400),
    ("/v1/rerank", {"query": "q", "documents": ["d"] * 3000}, 400),
    ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": -1}, 400),
    ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400),
    ("/score", {"text_1": [], "text_2": "c"}, 400),
    ("/score", {"text_1": 3, "text_2": "c"}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1}, 400),
]


def test_hostile_input_gets_4xx_envelopes(st_server) -> None:
    server, _ = st_server
    for path, body, status in HOSTILE:
        assert_error(post(server.url, path, body), status)
    stats = engine_stats(server.url)
    assert stats["num_running"] == stats["num_waiting"] == 0


def test_a_generate_server_refuses_pooling(tiny_server) -> None:
    body = {"model": TINY_NAME, "input": "hi"}
    err = assert_error(post(tiny_server.url, "/v1/embeddings", body), 400, "model")
    assert "--runner pooling" in err["message"]
