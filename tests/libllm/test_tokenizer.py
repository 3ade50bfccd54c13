"""The tokenizer: ids equal to sentencepiece's on tok512.model, run.c's merge rule, both
vocabulary formats, round trips, and incremental decoding of split UTF-8 characters."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmos.libllm.tokenizer import Tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
# The built-in model as GGUF, and its tokenizer as a SentencePiece model (tests/fixtures/ORIGIN.md).
FIXTURES = REPO / "tests" / "fixtures"
SHIPPED = REPO / "servers" / "runner" / "models" / "tok512.bin"

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Hello world",
    "  two  leading spaces and  doubles",
    "trailing space ",
    " ",
    "Punctuation: !?.,;:'\"()[]{}<>-_/\\|@#$%^&*~`",
    "Digits 0123456789, 3.14159 and 1,000,000.",
    "Café naïve résumé à la façon de Noël, Ærø, Straße",
    "Emoji: 🙂🚀🎉 👩‍👩‍👧 ok",
    "日本語のテキスト and 中文 and Кириллица",
    "tab\tnew\nline\r\ncarriage",
    "x\u0301 combining, \u00a0nbsp, zero\u200bwidth",
    "Zoo",
    "a" * 80,
    "The end.\n\nThe next story: Tom and Sue went to the zoo to see the big lions!",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(SHIPPED)


@pytest.fixture(scope="module")
def gguf_tok() -> Tokenizer:
    return load_tokenizer(FIXTURES / "stories260K-f32.gguf")


@pytest.fixture(scope="module")
def sp() -> object:
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece (dev extra) is not installed")
    return spm.SentencePieceProcessor(model_file=str(FIXTURES / "tok512.model"))


def test_vocabulary_facts(tok: Tokenizer) -> None:
    assert tok.vocab_size == 512 and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.stop_ids == {1, 2}
    assert tok.pieces[1] == b"\n<s>\n" and tok.pieces[3] == b"<0x00>"
    assert tok.encode("") == [1] and tok.encode("", bos=False) == []
    assert tok.encode("hi", eos=True)[-1] == 2


def test_gguf_vocabulary_is_the_same(tok: Tokenizer, gguf_tok: Tokenizer) -> None:
    assert gguf_tok.vocab_size == tok.vocab_size
    assert gguf_tok.stop_ids == {1, 2} and gguf_tok.bos_id == 1 and gguf_tok.eos_id == 2
    # GGUF spells spaces U+2581 and the specials differently; text pieces are the same.
    for i in range(3, tok.vocab_size):
        assert gguf_tok.pieces[i] == tok.pieces[i], i
    assert gguf_tok.scores[3:] == tok.scores[3:]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_sentencepiece(
    text: str, tok: Tokenizer, gguf_tok: Tokenizer, sp: object
) -> None:
    expected = sp.encode(text)  # type: ignore[attr-defined]
    assert tok.encode(text, bos=False) == expected
    assert gguf_tok.encode(text, bos=False) == expected
    assert tok.encode(text) == [1, *expected]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text: str, tok: Tokenizer, sp: object) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids[1:]) == sp.decode(ids[1:]) == text  # type: ignore[attr-defined]


def run_c_encode(tok: Tokenizer, text: str) -> list[int]:
    """A direct port of llama2.c run.c encode(): O(n^2) best-pair search, leftmost on ties."""
    vocab = {p: i for i, p in reversed(list(enumerate(tok.pieces)))}
    ids = [1]
    if text:
        ids.append(vocab[b" "])
    for ch in text:
        raw = ch.encode("utf-8")
        ids += [vocab[raw]] if raw in vocab else [b + 3 for b in raw]
    while True:
        best, best_id, best_idx = -1e10, -1, -1
        for i in range(len(ids) - 1):
            merged = vocab.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if merged is not None and tok.scores[merged] > best:
                best, best_id, best_idx = tok.scores[merged], merged, i
        if best_idx == -1:
            return ids
        ids[best_idx : best_idx + 2] = [best_id]


ALPHABET = st.sampled_from([*"aeiou ntsrhldTHE.,!?'\n", "é", "ß", "🙂", "語", "\u0301"])


@given(st.lists(ALPHABET, max_size=60).map("".join))
def test_heap_merge_equals_run_c(text: str) -> None:
    tok = load_tokenizer(SHIPPED)
    assert tok.encode(text) == run_c_encode(tok, text)


@given(st.text(max_size=40))
def test_any_text_round_trips(text: str) -> None:
    tok = load_tokenizer(SHIPPED)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates are not text
        return
    assert tok.decode(tok.encode(text)) == text


def test_incremental_decode_holds_split_characters(tok: Tokenizer) -> None:
    text = "A 🙂 and 語 and é."
    ids = tok.encode(text)
    dec = tok.decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    # The emoji's 4 byte tokens give "", "", "", "🙂"; 語's three give "", "", "語".
    from_bytes = [p for p, i in zip(pieces, ids, strict=True) if tok.pieces[i].startswith(b"<0x")]
    assert from_bytes == ["", "", "", "🙂", "", "", "語"]


def test_streaming_after_a_prompt(tok: Tokenizer) -> None:
    prompt = tok.encode("Zoo")
    dec = tok.decoder(prompt)
    # After a prompt, a generated piece keeps its leading space (only the first text
    # piece after BOS loses the dummy prefix).
    assert dec.push(tok.encode("was", bos=False)[0]) == " was"
    assert tok.decoder().push_many([1, *tok.encode("Once", bos=False)]) == "Once"


def test_decode_edge_cases(tok: Tokenizer) -> None:
    assert tok.decode([1, 2]) == ""  # specials render as nothing
    assert tok.decode([3 + 0xC3]) == "\ufffd"  # a dangling lead byte, flushed
    assert tok.piece_bytes(3 + 0x20, at_start=True) == b" "  # run.c keeps a <0x20>'s space
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([512])


def test_rejects_a_truncated_file(tmp_path: Path) -> None:
    data = SHIPPED.read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data[:100] + struct.pack("<fi", 0.0, 1000))
    with pytest.raises(ValueError):
        load_tokenizer(bad)
