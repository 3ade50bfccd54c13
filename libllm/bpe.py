"""Byte-level BPE for GGUF "gpt2" vocabularies (Llama 3, Qwen 2, SmolLM, GPT-2, ...), on HF
tokenizers: a BPE model from the file's vocabulary and merges, pre-tokenized by the regexes
llama.cpp uses for the file's ``tokenizer.ggml.pre`` (libllm.pretokenizers), then bytes
mapped to GPT-2's printable characters. Special tokens are split out beforehand, as
llama.cpp does (libllm.special), so HF's own added-token handling is not used.

Decoding maps each piece back to bytes through GPT-2's byte<->unicode table, so a character
split across tokens comes out whole from the incremental decoder.
"""

from __future__ import annotations

from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HfTokenizer

from llmos.libllm.gguf_vocab import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_NORMAL,
    ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
    GgufVocab,
    decode_texts,
)
from llmos.libllm.tokenizer import Tokenizer

__all__ = ["BpeTokenizer", "byte_to_unicode"]


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table: every byte to a printable character (bytes_to_unicode in its encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in byte_to_unicode().items()}


def _piece_to_bytes(text: str) -> bytes:
    """llama_decode_text: each character back to its byte; one outside the table (not from a
    byte-level vocabulary) stays as its UTF-8."""
    try:
        return bytes(_UNICODE_TO_BYTE[c] for c in text)
    except KeyError:
        return b"".join(bytes([_UNICODE_TO_BYTE[c]]) if c in _UNICODE_TO_BYTE
                        else c.encode("utf-8", errors="surrogateescape") for c in text)


def _merges(raw: list[bytes], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The file's merges as pairs, split at the first space after the first character (as
    llama.cpp does). Kept: the first of repeated pairs (llama.cpp's rank), and only pairs whose
    sides and result are tokens (HF refuses others; such a merge would leave llama.cpp a
    non-token that it spells byte by byte, which no real vocabulary relies on)."""
    pairs: dict[tuple[str, str], None] = {}
    for m in decode_texts(raw):
        k = m.find(" ", 1)
        if k > 0:
            a, b = m[:k], m[k + 1:]
            if a in vocab and b in vocab and a + b in vocab:
                pairs.setdefault((a, b))
    return list(pairs)


class BpeTokenizer(Tokenizer):
    """A GGUF byte-level BPE vocabulary (``tokenizer.ggml.model = "gpt2"``)."""

    def __init__(self, vocab: GgufVocab) -> None:
        pre = vocab.pre
        if pre is None:
            raise ValueError(f"{vocab.path}: a 'gpt2' vocabulary needs a pre-tokenizer")
        texts = vocab.texts()
        ids = dict(zip(texts, range(len(texts)), strict=True))  # the last repeated text wins
        model = models.BPE(vocab=ids, merges=_merges(vocab.merges, ids),
                           ignore_merges=pre.ignore_merges)
        hf = HfTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        self._hf = hf
        decoded: list[bytes] = [b""] * len(texts)
        silent: set[int] = {vocab.bos_id, vocab.eos_id}
        for i, (text, attr) in enumerate(zip(texts, vocab.attrs, strict=True)):
            if attr & (ATTR_CONTROL | ATTR_UNKNOWN):
                silent.add(i)  # token_to_piece renders these only when asked for specials
            elif attr & ATTR_USER_DEFINED:
                decoded[i] = vocab.tokens[i]  # as written, not byte-level
            elif attr & ATTR_NORMAL:
                decoded[i] = _piece_to_bytes(text)
            elif attr & ATTR_BYTE and len(text) == 6 and text.startswith("<0x"):
                decoded[i] = bytes([int(text[3:5], 16)])
            else:
                silent.add(i)  # unused and undefined tokens render as nothing
        super().__init__(decoded, special_ids=silent, **vocab.tokenizer_arguments(texts))

    def _encode_fragment(self, text: str, after_special: bool) -> list[int]:
        ids: list[int] = self._hf.encode(text, add_special_tokens=False).ids
        return ids
