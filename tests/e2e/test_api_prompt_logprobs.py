"""Prompt logprobs on a real server: echo + logprobs (max_tokens 0 and 1, streamed), vLLM's
prompt_logprobs on completions and chat, and lm-evaluation-harness scoring through it."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from e2e_helpers import TINY_NAME, assert_error

pytestmark = pytest.mark.timeout(120)

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def reference(tiny_model: str):
    """(token ids of PROMPT, transformers' float32 log_softmax at each position)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model)(PROMPT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # [T, vocab]
    return ids, logits.log_softmax(dim=-1)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": TINY_NAME, **body}, timeout=60)


def test_echo_logprobs_score_the_prompt(tiny_server, reference) -> None:
    ids, ref = reference
    usage = None
    want = [None] + [ref[p - 1, ids[p]].item() for p in range(1, len(ids))]
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "temperature": 0}
    only = post(tiny_server.url, "/v1/completions", body | {"max_tokens": 0}).json()
    (choice,) = only["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    lps = choice["logprobs"]
    assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    assert len(lps["tokens"]) == len(ids) and lps["text_offset"][0] == 0
    got = lps["token_logprobs"]
    assert max(abs(g - w) for g, w in zip(got[1:], want[1:], strict=True)) < 1e-3
    best = [max(top.values()) for top in lps["top_logprobs"][1:]]
    assert best == pytest.approx(ref[:-1].max(dim=-1).values.tolist(), abs=1e-3)
    assert only["usage"]["completion_tokens"] == 0
    # lm-eval's request: one generated token follows the echoed prompt's entries
    one = post(tiny_server.url, "/v1/completions", body | {"max_tokens": 1}).json()
    one_lps = one["choices"][0]["logprobs"]
    assert len(one_lps["tokens"]) == len(ids) + 1
    assert one_lps["token_logprobs"][:-1] == got
    streamed = {"text": "", "token_logprobs": []}
    stream = {"max_tokens": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST",
        f"{tiny_server.url}/v1/completions",
        json={"model": TINY_NAME, **body, **stream},
        timeout=60,
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    streamed["text"] += c["text"]
                    streamed["token_logprobs"] += (c["logprobs"] or {}).get("token_logprobs", [])
                usage = chunk.get("usage") or usage
    assert streamed == {"text": PROMPT, "token_logprobs": got}
    assert (usage["completion_tokens"], usage["prompt_tokens"]) == (0, len(ids))


def test_vllm_prompt_logprobs_on_completions_and_chat(tiny_server, reference) -> None:
    ids, ref = reference
    out = post(
        tiny_server.url, "/v1/completions", {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2}
    ).json()
    plps = out["choices"][0]["prompt_logprobs"]
    assert plps[0] is None and len(plps) == len(ids)
    for p in range(1, len(ids)):
        entry = plps[p][str(ids[p])]
        assert abs(entry["logprob"] - ref[p - 1, ids[p]].item()) < 1e-3
        assert entry["rank"] == int((ref[p - 1] > ref[p - 1, ids[p]]).sum()) + 1
        top = {int(t) for t, e in plps[p].items() if e["rank"] <= 2}
        assert top >= set(ref[p - 1].topk(2).indices.tolist())
    chat = post(
        tiny_server.url,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 0},
    ).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) > 1
    plain = post(tiny_server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}).json()
    assert "prompt_logprobs" not in plain["choices"][0]
    bad = {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 1, "stream": True}
    assert_error(post(tiny_server.url, "/v1/completions", bad), 400, "prompt_logprobs")
    assert_error(post(tiny_server.url, "/v1/completions", {"prompt": "x", "max_tokens": 0}), 400)


DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a dog"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"question": "The sky is", "choices": [" green today", " blue", " loud"], "answer": 1},
    {"question": "Cats say", "choices": [" moo", " meow and purr"], "answer": 1},
]


def test_lm_eval_local_completions_matches_its_hf_model(
    tiny_server, tiny_model, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the local JSON file only, no hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # not the user's cache
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
    )
    tasks = TaskManager(include_path=str(tmp_path))

    def evaluate(model: str, args: str) -> tuple[float, list[list[float]]]:
        out = lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=["tiny_choice"], task_manager=tasks
        )
        samples = sorted(out["samples"]["tiny_choice"], key=lambda s: s["doc_id"])
        lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
        return out["results"]["tiny_choice"]["acc,none"], lls

    url = f"{tiny_server.url}/v1/completions"
    served = evaluate(
        "local-completions",
        f"model={TINY_NAME},base_url={url},tokenizer={tiny_model},"
        "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1",
    )
    hf = evaluate("hf", f"pretrained={tiny_model},dtype=float32,device=cpu")
    assert len(served[1]) == len(DOCS) and [len(d) for d in served[1]] == [3, 2, 3, 2]
    assert served[0] == hf[0]
    flat = [
        (a, b) for sa, sb in zip(served[1], hf[1], strict=True) for a, b in zip(sa, sb, strict=True)
    ]
    assert max(abs(a - b) for a, b in flat) < 1e-3, flat
