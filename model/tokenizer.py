"""Tokenizer: a transformers tokenizer (HF folder or GGUF metadata) plus what serving needs:
stop ids (EOS and the template's end-of-turn), chat rendering, token text for logprobs."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from model.disk_cache import cache_dir

logger = logging.getLogger(__name__)

# End-of-turn markers of common chat templates; added to the stop ids when the template uses them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SIDECAR = "tokenmill.json"  # eos ids read from the GGUF metadata, cached with the tokenizer


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: printable stand-in character → raw byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _join_text(content: Any, index: int) -> str:
    """OpenAI content (str, None, or list of {"type": "text", "text": ...} parts) → one string."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(
                f"message {index}: only text content parts are supported, got {kind!r}"
            )
        parts.append(str(part.get("text", "")))
    return "\n".join(parts)


class Tokenizer:
    """Wraps a transformers tokenizer; `eos_token_ids` are every id that ends a generation."""

    def __init__(self, hf: Any, eos_token_ids: list[int]) -> None:
        self.hf = hf
        self.bos_token_id: int | None = hf.bos_token_id
        self.vocab_size: int = len(hf)  # base vocab + added tokens (the model's may be padded)
        eos = list(eos_token_ids) + _as_ids(hf.eos_token_id)
        template = hf.chat_template if isinstance(hf.chat_template, str) else ""
        for tok in END_OF_TURN_TOKENS:
            if tok in template:
                tid = hf.convert_tokens_to_ids(tok)
                if isinstance(tid, int) and tid != hf.unk_token_id:
                    eos.append(tid)
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos))
        self._special_ids = set(hf.all_special_ids) | set(getattr(hf, "added_tokens_decoder", {}))
        backend = getattr(hf, "backend_tokenizer", None)
        self._byte_level = backend is not None and "ByteLevel" in str(backend.decoder)
        self._byte_decoder = _byte_decoder()
        # NOTE: a vocab piece is at least as long as the text it decodes to (byte-level pieces
        # spell one char per byte; SentencePiece's byte pieces are longer), so text of N chars
        # has at least N / max_token_chars tokens.
        self.max_token_chars: int = max((len(p) for p in hf.get_vocab()), default=1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> list[int]:
        """Render the chat template (or `chat_template`, with `template_kwargs` as variables) to
        token ids; the template writes its own special tokens."""
        template = chat_template or self.hf.chat_template
        if not template:
            raise ValueError("this model has no chat template: use /v1/completions with a prompt")
        msgs = [dict(m, content=_join_text(m.get("content"), i)) for i, m in enumerate(messages)]
        try:
            text = self.hf.apply_chat_template(
                msgs,
                tools=tools,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **template_kwargs,
            )
        except Exception as e:  # noqa: BLE001 - jinja errors of a user's template or kwargs
            raise ValueError(f"{type(e).__name__}: {e}") from e
        return self.encode(text, add_special_tokens=False)

    def template_takes(self, name: str, chat_template: str | None = None) -> bool:
        """Whether the chat template reads a variable or key, e.g. "tools" or "tool_calls"."""
        template = chat_template or self.hf.chat_template
        return isinstance(template, str) and name in template

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The token's raw bytes (OpenAI's logprob `bytes`): byte-level pieces mapped back to
        bytes, SentencePiece byte pieces as their byte, special tokens as their UTF-8 text."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        piece = self.hf.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in self._special_ids:
            return piece.encode("utf-8")
        if self._byte_level:
            try:
                return bytes(self._byte_decoder[c] for c in piece)
            except KeyError:
                return piece.encode("utf-8")
        m = _SP_BYTE.match(piece)
        if m is not None:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def id_to_token(self, token_id: int) -> str:
        """Token text as OpenAI logprobs show it: 'Ġthe' → ' the', partial UTF-8 → 'bytes:\\xe6'."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # printable ASCII stays readable, the rest as \xNN escapes: 'bytes: \xe6'
            return "bytes:" + "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in raw)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _load_folder(folder: str) -> Tokenizer:
    from transformers import AutoTokenizer

    root = Path(folder)
    if not any((root / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in model folder {folder}"
        )
    hf = AutoTokenizer.from_pretrained(folder)
    eos = _as_ids(_read_json(root / "config.json").get("eos_token_id"))
    eos += _as_ids(_read_json(root / "generation_config.json").get("eos_token_id"))
    eos += _as_ids(_read_json(root / _SIDECAR).get("eos_token_ids"))
    return Tokenizer(hf, eos)


def _cache_dir(path: str) -> Path | None:
    """Per-file cache of the converted tokenizer, keyed by name, size and mtime; '' disables it."""
    root = cache_dir("tokenizers")
    if root is None:
        return None
    st = os.stat(path)
    stem = os.path.basename(path).removesuffix(".gguf")
    return root / f"{stem}-{st.st_size}-{st.st_mtime_ns}"


def _gguf_eos_ids(path: str) -> list[int]:
    """EOS plus end-of-turn ids from GGUF metadata (transformers' conversion keeps only EOS)."""
    from model.gguf_weights import _read

    reader = _read(path)
    if "tokenizer.ggml.model" not in reader.fields:
        raise ValueError(f"GGUF file {path} carries no tokenizer (no tokenizer.ggml.model key)")
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = reader.fields.get(f"tokenizer.ggml.{key}")
        if value is not None:
            ids.append(int(value))
    return ids


def _load_gguf(path: str) -> Tokenizer:
    """Convert the GGUF tokenizer once (~4 s) and cache the HF files; later loads take ~0.3 s."""
    from transformers import AutoTokenizer

    cache = _cache_dir(path)
    if cache is not None and (cache / _SIDECAR).is_file():
        try:
            return _load_folder(str(cache))
        except (OSError, ValueError) as e:
            logger.warning("ignoring broken tokenizer cache %s: %s", cache, e)
    eos = _gguf_eos_ids(path)  # also validates the file with a clear error
    try:
        hf = AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
        )
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"cannot build a tokenizer from GGUF metadata of {path}: {e}") from e
    if cache is not None:
        _save_cache(hf, eos, cache)
    return Tokenizer(hf, eos)


def _save_cache(hf: Any, eos: list[int], cache: Path) -> None:
    """Write to a temp folder, then rename: concurrent loaders never see a half-written cache."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
        hf.save_pretrained(tmp)
        (tmp / _SIDECAR).write_text(json.dumps({"eos_token_ids": eos}))
        try:
            os.rename(tmp, cache)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        logger.warning("cannot cache the converted tokenizer in %s: %s", cache, e)


def load_tokenizer(model_path: str) -> Tokenizer:
    """Tokenizer of an HF model folder or a .gguf file; FileNotFoundError when the path or the
    tokenizer files are missing, ValueError for a GGUF file without a usable tokenizer."""
    model_path = os.fspath(model_path)
    if os.path.isdir(model_path):
        return _load_folder(model_path)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"model path not found: {model_path}")
    return _load_gguf(model_path)
