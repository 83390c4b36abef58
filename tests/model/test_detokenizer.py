"""IncrementalDetokenizer on SmolLM2's real byte-level BPE and a tiny SentencePiece-style BPE."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.timeout(60)

MIXED = "Hello 🎉 世界, naïve café"
PLAIN = "The capital of France is Paris. It is big."


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def stream(
    detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1
) -> tuple[list[str], str | None]:
    """Feed `ids` `chunk` at a time; return the deltas and the stop string that matched."""
    deltas = []
    for i in range(0, len(ids), chunk):
        text, stop = detok.step(ids[i : i + chunk])
        deltas.append(text)
        if stop is not None:
            return deltas, stop
    return deltas, None


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("prompt", ["", "Say something:"])
def test_streaming_equals_full_decode(tok, chunk: int, prompt: str) -> None:
    ids = tok.encode(MIXED + " " + PLAIN + " 😀👍🏽 ok", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode(prompt, add_special_tokens=False))
    deltas, stop = stream(detok, ids, chunk)
    assert stop is None
    assert not any("\ufffd" in d for d in deltas)
    assert detok.flush() == ""
    assert "".join(deltas) == detok.output_text == tok.decode(ids)
    assert tok.decode(ids) == MIXED + " " + PLAIN + " 😀👍🏽 ok"


def test_multibyte_chars_wait_for_their_last_byte(tok) -> None:
    ids = tok.encode(" 🎉", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's bytes span several tokens
    detok = IncrementalDetokenizer(tok, [])
    deltas, _ = stream(detok, ids)
    assert deltas == [""] * (len(ids) - 1) + [" 🎉"]


def test_project_tokenizer_wrapper(smollm2_tokenizer_dir: Path) -> None:
    from model.tokenizer import load_tokenizer

    wrapped = load_tokenizer(str(smollm2_tokenizer_dir))
    ids = wrapped.encode(MIXED, add_special_tokens=False)
    detok = IncrementalDetokenizer(wrapped, wrapped.encode("Hi", add_special_tokens=False))
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == MIXED


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize(
    ("stop", "include", "expected"),
    [
        (["of Fra"], False, "The capital "),  # spans " of" + " France"
        (["of Fra"], True, "The capital of Fra"),
        (["s. It"], False, "The capital of France is Pari"),  # spans three tokens
        (["big", "Paris", "zzz"], False, "The capital of France is "),  # earliest match wins
    ],
)
def test_stop_strings_across_token_boundaries(
    tok, chunk: int, stop: list[str], include: bool, expected: str
) -> None:
    ids = tok.encode(PLAIN, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=stop, include_stop_str_in_output=include)
    deltas, matched = stream(detok, ids, chunk)
    assert matched == ("Paris" if "Paris" in stop else stop[0])
    assert "".join(deltas) == detok.output_text == expected
    assert detok.step(ids[:2]) == ("", None)  # finished: nothing more comes out
    assert detok.flush() == ""


def test_stop_prefix_is_held_back_then_released(tok) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["France is Lyon"])
    ids = tok.encode(PLAIN, add_special_tokens=False)
    deltas, matched = stream(detok, ids[:5])  # "The capital of France is"
    assert matched is None
    assert "".join(deltas) == detok.output_text == "The capital of "
    assert detok.flush() == "France is"
    assert detok.output_text == "The capital of France is"

    detok = IncrementalDetokenizer(tok, [], stop=["France is Lyon"])
    deltas, matched = stream(detok, ids)  # " Paris" breaks the prefix: everything comes out
    assert matched is None
    assert deltas[3:6] == [" ", "", "France is Paris"]  # " France" leaves its space
    assert "".join(deltas) == PLAIN


def test_stop_string_inside_multibyte_text(tok) -> None:
    ids = tok.encode(MIXED, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["界", "café"])
    deltas, matched = stream(detok, ids)
    assert matched == "界"
    assert detok.output_text == "Hello 🎉 世"
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip: bool) -> None:
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("Hi", add_special_tokens=False) + [im_end, im_end]
    ids += tok.encode(" there", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [1, 520], skip_special_tokens=skip)
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == ("Hi there" if skip else "Hi<|im_end|><|im_end|> there")


def test_window_stays_small_on_long_outputs(tok) -> None:
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = (tok.encode(MIXED + " " + PLAIN, add_special_tokens=False) + [im_end]) * 100
    detok = IncrementalDetokenizer(tok, [], stop=["never appears"])
    longest = 0
    for t in ids:
        detok.step([t])
        longest = max(longest, len(detok._ids), len(detok._held))
    assert longest <= 16  # O(window) per token, whatever the output length
    assert detok.output_text + detok.flush() == tok.decode(ids, skip_special_tokens=True)


def test_sentencepiece_style_leading_spaces() -> None:
    """Llama-style Metaspace decoding drops a window's first space; the prefix window keeps it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the cat sat on the mat", "hello world", "a dog and a cat"] * 20
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    sp.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>")
    prompt = hf.encode("hello world", add_special_tokens=False)
    ids = hf.encode("the cat sat on a mat", add_special_tokens=False)
    assert "".join(hf.decode([i]) for i in ids) != " the cat sat on a mat"  # naive is wrong
    detok = IncrementalDetokenizer(hf, prompt)
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == " the cat sat on a mat"
    detok = IncrementalDetokenizer(hf, [])
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == hf.decode(ids) == "the cat sat on a mat"
