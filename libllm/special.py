"""Splitting special tokens out of text before tokenizing it, as llama.cpp's
tokenizer_st_partition does (src/llama-vocab.cpp).

Longer special tokens go first: each one is cut out of every text fragment left so far, so a
long token wins over a shorter one that overlaps it. User-defined tokens are always cut out;
control and unknown tokens only when the caller asks to parse special tokens. A token marked
LSTRIP/RSTRIP also takes the whitespace before/after it (C isspace: ASCII only).
"""

from __future__ import annotations

from collections.abc import Sequence

from llmos.libllm.gguf_vocab import (
    ATTR_CONTROL,
    ATTR_LSTRIP,
    ATTR_RSTRIP,
    ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
)

__all__ = ["Fragment", "SpecialTokens"]

Fragment = str | int  # text still to tokenize, or the id of a special token cut out of it
_C_SPACE = " \t\n\v\f\r"


class SpecialTokens:
    """The special tokens of one vocabulary, ready to split them out of text."""

    def __init__(self, texts: Sequence[str], attrs: Sequence[int]) -> None:
        special = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
        ids = [i for i, a in enumerate(attrs) if a & special and texts[i]]
        # llama.cpp sorts by length only (std::sort, so ties fall as they may); ids break ties.
        ids.sort(key=lambda i: (-len(texts[i]), i))
        entries = [(i, texts[i], attrs[i]) for i in ids]
        self._all = entries
        self._always = [e for e in entries if not e[2] & (ATTR_CONTROL | ATTR_UNKNOWN)]

    def __len__(self) -> int:
        return len(self._all)

    def partition(self, text: str, *, parse_special: bool) -> list[Fragment]:
        """``text`` as a list of text fragments and special token ids, in order."""
        entries = self._all if parse_special else self._always
        # A token absent from the whole text is absent from every fragment of it.
        chars = set(text)
        fragments: list[Fragment] = [text]
        for tid, tok, attr in entries:
            if tok[0] not in chars or tok not in text:
                continue
            out: list[Fragment] = []
            for frag in fragments:
                if isinstance(frag, int) or tok not in frag:
                    out.append(frag)
                else:
                    _cut(frag, tid, tok, attr, out)
            fragments = out
        return fragments


def _cut(frag: str, tid: int, tok: str, attr: int, out: list[Fragment]) -> None:
    start = 0
    while (at := frag.find(tok, start)) >= 0:
        left = frag[start:at]
        if attr & ATTR_LSTRIP:
            left = left.rstrip(_C_SPACE)
        if left:
            out.append(left)
        out.append(tid)
        start = at + len(tok)
        if attr & ATTR_RSTRIP:
            while start < len(frag) and frag[start] in _C_SPACE:
                start += 1
    if start < len(frag):
        out.append(frag[start:])
