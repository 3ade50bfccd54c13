"""llama2.c's vocabulary file (``tokenizer.bin``) and run.c's encoding, exactly.

BOS, a dummy leading space, one piece per UTF-8 character with byte fallback, then merges by
score. This is what the built-in stories260K model was trained with; GGUF "llama"
vocabularies use llama.cpp's variant of the same idea instead (libllm.spm).
"""

from __future__ import annotations

import heapq
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from llmos.libllm.tokenizer import Tokenizer

__all__ = ["Llama2cTokenizer"]

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_MIN_SCORE = -1e10  # run.c starts its best-score search here: no pair at or below ever merges


class Llama2cTokenizer(Tokenizer):
    """A SentencePiece vocabulary encoded as llama2.c's run.c ``encode`` does.

    Args:
        pieces: the bytes of every token, a space stored as b" ".
        scores: merge priority per token (higher merges first).
        bos_id, eos_id: the begin/end-of-sequence ids.
        stop_ids: ids that end generation.
        special_ids: ids that decode to nothing (control and unknown tokens).
    """

    def __init__(
        self,
        pieces: Sequence[bytes],
        scores: Sequence[float],
        *,
        bos_id: int = 1,
        eos_id: int = 2,
        stop_ids: Iterable[int] = (1, 2),
        special_ids: Iterable[int] = (0, 1, 2),
    ) -> None:
        if len(pieces) != len(scores) or not pieces:
            raise ValueError("pieces and scores must be non-empty and of equal length")
        self.pieces: tuple[bytes, ...] = tuple(pieces)
        self.scores: tuple[float, ...] = tuple(float(s) for s in scores)
        # run.c looks pieces up by exact bytes (bsearch over the sorted vocabulary); the first
        # id wins if a piece repeats.
        self._lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self._lookup.setdefault(p, i)
        # Byte fallback: the id whose piece is <0xXX> for each byte (run.c assumes b + 3).
        self._byte_ids: list[int] = [-1] * 256
        piece_bytes: list[bytes] = list(self.pieces)
        for i, p in enumerate(self.pieces):
            m = _BYTE_PIECE.fullmatch(p)
            if m:
                b = int(m.group(1), 16)
                if self._byte_ids[b] == -1:
                    self._byte_ids[b] = i
                piece_bytes[i] = bytes([b])

        def text(i: int) -> str:  # llama2.c stores BOS as "\n<s>\n"; chat templates want "<s>"
            return self.pieces[i].decode("utf-8", errors="replace").strip() if 0 <= i < len(pieces) else ""

        super().__init__(piece_bytes, bos_id=bos_id, eos_id=eos_id, stop_ids=stop_ids,
                         special_ids=special_ids, bos_token=text(bos_id), eos_token=text(eos_id),
                         add_bos=True, space_prefix=True)

    @classmethod
    def from_file(cls, path: str | Path) -> Llama2cTokenizer:
        """Read llama2.c's ``tokenizer.bin``: max_token_length, then (score, len, bytes) each.

        llama2.c stops generation at BOS (its training data separates stories with BOS) and
        GGUF copies declare EOS, so both are stop ids.
        """
        data = Path(path).read_bytes()
        offset = 4
        pieces: list[bytes] = []
        scores: list[float] = []
        try:
            while offset < len(data):
                score, length = struct.unpack_from("<fi", data, offset)
                offset += 8
                if length < 0 or offset + length > len(data):
                    raise ValueError(f"{path}: bad token length {length}")
                pieces.append(data[offset : offset + length])
                scores.append(score)
                offset += length
        except struct.error as e:
            raise ValueError(f"{path}: truncated tokenizer file") from e
        return cls(pieces, scores, bos_id=1, eos_id=2, stop_ids=(1, 2), special_ids=(0, 1, 2))

    # ------------------------------------------------------------------ encoding
    def _encode_fragment(self, text: str, after_special: bool) -> list[int]:
        # llama2.c files have no special tokens: this is always the whole text.
        return self._merge(self._initial(text))

    def _initial(self, text: str) -> list[int]:
        # The dummy prefix, then one piece per UTF-8 character, else one per byte.
        out: list[int] = []
        for unit in [" ", *text]:
            raw = unit.encode("utf-8")
            tid = self._lookup.get(raw)
            if tid is not None:
                out.append(tid)
            else:
                for b in raw:
                    bid = self._byte_ids[b]
                    out.append(bid if bid >= 0 else 0)
        return out

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c merges, repeatedly, the adjacent pair whose joined piece scores highest,
        the leftmost on ties. A heap over a linked list picks the same pair each round in
        O(n log n) instead of run.c's O(n^2): positions keep their original order, so the
        smallest original index among the best-scored pairs is the leftmost one."""
        n = len(ids)
        if n < 2:
            return ids
        nxt = [*range(1, n), -1]
        prev = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int]] = []
        pieces, lookup, scores = self.pieces, self._lookup, self.scores

        def push(i: int) -> None:
            j = nxt[i]
            if j < 0:
                return
            merged = lookup.get(pieces[ids[i]] + pieces[ids[j]])
            if merged is not None and scores[merged] > _MIN_SCORE:
                heapq.heappush(heap, (-scores[merged], i, ids[i], ids[j], merged))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right, merged = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j < 0 or ids[i] != left or ids[j] != right:
                continue  # stale: one side has merged since this pair was pushed
            ids[i] = merged
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prev[nxt[j]] = i
            if prev[i] >= 0:
                push(prev[i])
            push(i)
        return [t for t, a in zip(ids, alive, strict=True) if a]

    # ------------------------------------------------------------------ decoding
    def _starts_with_prefix_space(self, token_id: int) -> bool:
        # run.c tests the stored piece, so a <0x20> byte token keeps its space.
        return self.pieces[token_id].startswith(b" ")
