"""llguidance vs xgrammar on the default tokenizer: schema compile time, mask time per token.

Run: .venv/bin/python benchmarks/grammar_libraries.py  (xgrammar is optional: pip install it, or put
it on PYTHONPATH, to measure it too). Each library walks the tokens of one valid document and
computes the allowed-token bitmask before every token, as the sampler would.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from model.tokenizer import load_tokenizer
from scheduler.config import default_model_path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city"],
        },
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "address", "role"],
}
DOC = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.com",
    "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"},
    "role": "admin",
    "score": 99.5,
}


def _llguidance(hf, vocab: int, schema: dict, doc_ids: list[int]) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    t_tok = time.perf_counter() - t0
    print(f"llguidance: tokenizer set-up {t_tok * 1e3:.1f} ms (once per server)")
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema), defaults={"whitespace_flexible": False}
    )
    m = llguidance.LLMatcher(tok, grammar)
    compile_s = time.perf_counter() - t0
    assert not m.is_error(), m.get_error()
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    times = []
    for t in doc_ids:
        t0 = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(m, mask, 0)
        times.append(time.perf_counter() - t0)
        assert m.consume_token(t), m.get_error()
    return compile_s, times


def _xgrammar(hf, vocab: int, schema: dict, doc_ids: list[int]) -> tuple[float, list[float]]:
    import xgrammar

    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    print(f"xgrammar: tokenizer set-up {(time.perf_counter() - t0) * 1e3:.1f} ms (once per server)")
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(",", ":")
    )
    m = xgrammar.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    times = []
    for t in doc_ids:
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - t0)
        assert m.accept_token(t)
    return compile_s, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer(default_model_path())
    vocab = tok.vocab_size
    doc_ids = tok.encode(json.dumps(DOC, separators=(",", ":")), add_special_tokens=False)
    print(f"vocab {vocab}, document of {len(doc_ids)} tokens")
    for name, fn in (("llguidance", _llguidance), ("xgrammar", _xgrammar)):
        try:
            runs = [fn(tok.hf, vocab, SCHEMA, doc_ids) for _ in range(args.repeat)]
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        compile_ms = statistics.median(r[0] for r in runs) * 1e3
        per_tok = [t * 1e6 for r in runs for t in r[1]]
        print(
            f"{name}: compile {compile_ms:.1f} ms (median of {args.repeat}); mask per token "
            f"mean {statistics.mean(per_tok):.1f} us, p50 {statistics.median(per_tok):.1f} us, "
            f"max {max(per_tok):.1f} us"
        )


if __name__ == "__main__":
    main()
