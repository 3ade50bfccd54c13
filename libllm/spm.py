"""SentencePiece BPE for GGUF "llama" vocabularies, as llama.cpp's llm_tokenizer_spm does it
(src/llama-vocab.cpp): spaces become U+2581 (after a leading one when the vocabulary adds a
space prefix), the text splits into one symbol per character, and the adjacent pair whose
joined text is the best-scored token merges, the leftmost on ties, until none is a token.
A symbol left that is no token becomes one byte token per UTF-8 byte.

Unlike run.c (libllm.llama2c), pairs merge by text, so characters that are not tokens on
their own can still merge, and no score is too low to merge.
"""

from __future__ import annotations

import heapq
import re

from llmos.libllm.gguf_vocab import (
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_NORMAL,
    ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
    GgufVocab,
)
from llmos.libllm.tokenizer import Tokenizer

__all__ = ["SpmTokenizer"]

_SPACE = "\u2581"  # SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _unescaped(texts: list[str]) -> list[bytes]:
    # One join and split for 262,144 pieces, unless a piece holds the separator.
    out = "\x00".join(texts).replace(_SPACE, " ").encode("utf-8", errors="surrogateescape").split(b"\x00")
    if len(out) == len(texts):
        return out
    return [t.replace(_SPACE, " ").encode("utf-8", errors="surrogateescape") for t in texts]


class SpmTokenizer(Tokenizer):
    """A GGUF SentencePiece vocabulary (``tokenizer.ggml.model = "llama"``), e.g. Llama 2,
    Phi-3, Gemma 3 (which adds no space prefix)."""

    def __init__(self, vocab: GgufVocab) -> None:
        texts = vocab.texts()
        # text_to_token: the last of repeated texts wins, as in llama.cpp's token_to_id.
        self._ids: dict[str, int] = dict(zip(texts, range(len(texts)), strict=True))
        self._score: list[float] = vocab.scores
        self.scores: tuple[float, ...] = tuple(vocab.scores)
        # Every piece with U+2581 shown as a space: what a normal token decodes to.
        self.pieces: tuple[bytes, ...] = tuple(_unescaped(texts))
        decoded = list(self.pieces)
        silent: set[int] = {vocab.bos_id, vocab.eos_id}
        for i, attr in enumerate(vocab.attrs):
            if attr & (ATTR_CONTROL | ATTR_UNKNOWN):
                silent.add(i)  # token_to_piece renders these only when asked for specials
            elif attr & ATTR_USER_DEFINED:
                decoded[i] = vocab.tokens[i]  # as written, U+2581 and all
            elif attr & ATTR_NORMAL:
                pass
            elif attr & ATTR_BYTE:
                m = _BYTE_PIECE.fullmatch(texts[i])
                if m is None:
                    raise ValueError(f"{vocab.path}: byte token {i} is {texts[i]!r}, not <0xXX>")
                decoded[i] = bytes([int(m.group(1), 16)])
            else:
                silent.add(i)  # unused and undefined tokens render as nothing
        self._byte_ids = [self._byte_token(b, vocab) for b in range(256)]
        super().__init__(decoded, special_ids=silent, space_prefix=vocab.add_space_prefix,
                         **vocab.tokenizer_arguments(texts))

    def _byte_token(self, b: int, vocab: GgufVocab) -> int:
        """llama.cpp's byte_to_token: <0xXX>, else the byte itself as a token, else (where
        llama.cpp would fail) the unknown token."""
        tid = self._ids.get(f"<0x{b:02X}>")
        if tid is None:
            tid = self._ids.get(bytes([b]).decode("utf-8", errors="surrogateescape"))
        if tid is None:
            tid = vocab.unk_id if vocab.unk_id is not None else 0
        return tid

    def _encode_fragment(self, text: str, after_special: bool) -> list[int]:
        if self.space_prefix and after_special:
            text = " " + text
        sym = list(text.replace(" ", _SPACE))
        n = len(sym)
        ids, score = self._ids, self._score
        nxt = [*range(1, n), -1]
        prev = list(range(-1, n - 1))
        # llama.cpp's work queue: best score first, then the leftmost pair. An entry is stale
        # once either side has changed, which their joined length tells.
        heap: list[tuple[float, int, int, int]] = []
        for i in range(n - 1):
            t = ids.get(sym[i] + sym[i + 1])
            if t is not None:
                heap.append((-score[t], i, i + 1, 2))
        heapq.heapify(heap)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = sym[left], sym[right]
            if not a or not b or len(a) + len(b) != size:
                continue
            sym[left] = a + b
            sym[right] = ""
            nxt[left] = after = nxt[right]
            if after >= 0:
                prev[after] = left
            before = prev[left]
            if before >= 0 and (t := ids.get(sym[before] + sym[left])) is not None:
                heapq.heappush(heap, (-score[t], before, left, len(sym[before]) + len(sym[left])))
            if after >= 0 and (t := ids.get(sym[left] + sym[after])) is not None:
                heapq.heappush(heap, (-score[t], left, after, len(sym[left]) + len(sym[after])))
        out: list[int] = []
        i = 0
        while i >= 0:
            s = sym[i]
            t = ids.get(s)
            if t is not None:
                out.append(t)
            else:
                out.extend(self._byte_ids[c] for c in s.encode("utf-8"))
            i = nxt[i]
        return out

    def _starts_with_prefix_space(self, token_id: int) -> bool:
        # The stored piece, as for llama2.c: a <0x20> byte token keeps its space.
        return self.pieces[token_id].startswith(b" ")
