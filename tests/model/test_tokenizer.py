"""Tokenizer: GGUF conversion (cold and cached), HF folders, chat template, readable token text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from model.tokenizer import Tokenizer, load_tokenizer

pytestmark = pytest.mark.timeout(60)

TEXT = "Hello the world! 日本語 ünïcode\n  two spaces, tabs\tand 123456."


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf: str) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


def test_gguf_conversion_cold_then_cached(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))
    cold = load_tokenizer(smollm2_gguf)
    cached_dirs = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(cached_dirs) == 1 and (cached_dirs[0] / "tokenmill.json").is_file()
    warm = load_tokenizer(smollm2_gguf)
    assert warm.encode(TEXT) == cold.encode(TEXT)
    assert warm.eos_token_ids == cold.eos_token_ids == [2]
    assert warm.hf.chat_template == cold.hf.chat_template


def test_round_trip_and_special_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode(TEXT)
    assert ids[0] != tok.bos_token_id  # SmolLM2's GGUF says add_bos_token = false
    assert tok.decode(ids) == TEXT
    assert tok.encode("Hello") == [19556]
    assert (tok.bos_token_id, tok.vocab_size) == (1, 49152)
    assert tok.hf.convert_ids_to_tokens(2) == "<|im_end|>"
    assert 2 in tok.eos_token_ids
    assert tok.decode([19556, 2]) == "Hello"
    assert tok.decode([19556, 2], skip_special_tokens=False) == "Hello<|im_end|>"


def test_chat_template_renders_turns(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "up?"}],
        },
        {"role": "assistant", "content": "Not much."},
        {"role": "user", "content": "Ok"},
    ]
    ids = tok.apply_chat_template(messages)
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is\nup?<|im_end|>\n"
        "<|im_start|>assistant\nNot much.<|im_end|>\n"
        "<|im_start|>user\nOk<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids.count(1) == 5  # <|im_start|> is one special token each time, never split
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt and len(ids) > len(no_prompt)
    default_system = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(default_system)


def test_chat_template_override_kwargs_tools_and_continue(smollm2_tokenizer):
    tok = smollm2_tokenizer
    template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if tools %}<tools:{{ tools | length }}>{% endif %}{{ greeting | default('') }}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    ids = tok.apply_chat_template(
        msgs, False, tools=[{"type": "function"}], chat_template=template, greeting="!"
    )
    assert tok.decode(ids) == "[user]hi[assistant]Hel<tools:1>!"
    assert tok.template_takes("tools", template) and not tok.template_takes("tools")
    # continue_final_message: the reply is left open for the model to go on
    cont = tok.decode(tok.apply_chat_template(msgs, False, continue_final_message=True))
    assert cont.endswith("Hel") and not cont.endswith("<|im_end|>\n")
    with pytest.raises(ValueError, match="TypeError|Error"):
        tok.apply_chat_template(msgs, chat_template=template, tokenize=True)


def test_chat_template_rejects_non_text_parts(smollm2_tokenizer):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(ValueError, match="image_url"):
        smollm2_tokenizer.apply_chat_template([{"role": "user", "content": [image]}])


def test_id_to_token_is_readable(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("Hello the world 日本")
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces[:3] == ["Hello", " the", " world"]
    # '日' is split across tokens: partial UTF-8 shows as escaped bytes, whole characters as text
    assert any(p.startswith("bytes:") and "\\xe6" in p for p in pieces)
    assert "本" in pieces
    assert tok.id_to_token(tok.encode("\n")[0]) == "\n"
    assert tok.id_to_token(2) == "<|im_end|>"
    with pytest.raises(ValueError, match="49152"):
        tok.id_to_token(49152)


def test_token_bytes_are_raw_even_for_partial_utf8(smollm2_tokenizer):
    """OpenAI's logprob `bytes`: the token's own bytes, which join to the text's UTF-8."""
    tok = smollm2_tokenizer
    text = "Hello the world 日本 🙂!"
    ids = tok.encode(text)
    raw = [tok.token_bytes(i) for i in ids]
    assert b"".join(raw) == text.encode()
    partial = [r for r in raw if r and r[0] >= 0x80]
    assert partial and any(_not_utf8(r) for r in partial)  # a token holding half a character
    assert tok.token_bytes(2) == b"<|im_end|>" and tok.is_special(2)
    assert tok.max_token_chars >= max(len(tok.decode([i])) for i in range(1000))


def test_hf_folder_eos_from_config_and_template(tiny_checkpoint, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = load_tokenizer(str(folder))
    assert tok.eos_token_ids == [2, 0]  # config 2, generation_config 0 and 2; <|im_end|> is 2
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert (
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])[-3:]
        == tok.encode("<|im_start|>assistant\n", add_special_tokens=False)[-3:]
    )


def test_folder_without_chat_template_raises(tiny_checkpoint, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(tiny_checkpoint("llama"), folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(str(folder))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_missing_tokenizer_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="empty_model"):
        load_tokenizer(str(Path(tmp_path, "empty_model").mkdir() or tmp_path / "empty_model"))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_tokenizer(str(tmp_path / "missing.gguf"))


def test_corrupt_gguf_raises_value_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", "")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ValueError, match="bad.gguf"):
        load_tokenizer(str(bad))
    bare = tmp_path / "no_tokenizer.gguf"
    w = gguf.GGUFWriter(str(bare), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="no_tokenizer.gguf"):
        load_tokenizer(str(bare))


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
