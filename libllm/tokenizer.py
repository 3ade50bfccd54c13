"""Tokenizer for llama-style SentencePiece BPE vocabularies (llama2.c tokenizer.bin or GGUF).

Runs in client processes (libllm): clients tokenize and detokenize, servers move ids only.
Owns the vocabulary tables of one model. Encoding follows llama2.c's run.c exactly (BOS, a
dummy leading space, one piece per UTF-8 character with byte fallback, then merges by score);
decoding is incremental so a stream never splits a UTF-8 character. It never does I/O beyond
reading the vocabulary file once.
"""

from __future__ import annotations

import codecs
import heapq
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["IncrementalDecoder", "Tokenizer", "load_tokenizer"]

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_SPM_SPACE = "\u2581"  # SentencePiece's visible space; llama2.c's tokenizer.bin stores ' '
_MIN_SCORE = -1e10  # run.c starts its best-score search here: no pair at or below ever merges

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_GGUF_CONTROL = 3
_GGUF_BYTE = 6


class Tokenizer:
    """One model's vocabulary: ``encode`` text to ids, ``decode`` ids to text.

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
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids: frozenset[int] = frozenset(stop_ids)
        self.special_ids: frozenset[int] = frozenset(special_ids)
        # run.c looks pieces up by exact bytes (bsearch over the sorted vocabulary); the first
        # id wins if a piece repeats.
        self._lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self._lookup.setdefault(p, i)
        # Byte fallback: the id whose piece is <0xXX> for each byte (run.c assumes b + 3).
        self._byte_ids: list[int] = [-1] * 256
        self._piece_bytes: list[bytes] = list(self.pieces)
        for i, p in enumerate(self.pieces):
            m = _BYTE_PIECE.fullmatch(p)
            if m:
                b = int(m.group(1), 16)
                if self._byte_ids[b] == -1:
                    self._byte_ids[b] = i
                self._piece_bytes[i] = bytes([b])
        for i in self.special_ids:
            self._piece_bytes[i] = b""

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_llama2c(cls, path: str | Path) -> Tokenizer:
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

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Read the llama (SentencePiece) vocabulary stored in a GGUF model file."""
        import gguf

        reader = gguf.GGUFReader(path)

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            if f is None:
                return default
            values = [f.parts[i] for i in f.data]
            decoded = [bytes(v) if v.dtype.name == "uint8" else v.tolist()[0] for v in values]
            return decoded if len(f.types) > 1 else decoded[0]

        model = field("tokenizer.ggml.model")
        if model != b"llama":
            raise ValueError(f"{path}: tokenizer model {model!r} is not supported (only 'llama')")
        tokens: list[bytes] = field("tokenizer.ggml.tokens")
        scores: list[float] = field("tokenizer.ggml.scores") or [0.0] * len(tokens)
        types: list[int] = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        pieces = [t.decode("utf-8").replace(_SPM_SPACE, " ").encode("utf-8") for t in tokens]
        bos = int(field("tokenizer.ggml.bos_token_id", 1))
        eos = int(field("tokenizer.ggml.eos_token_id", 2))
        unk = field("tokenizer.ggml.unknown_token_id")
        eot = field("tokenizer.ggml.eot_token_id")
        # BOS is a stop id too: a llama-vocabulary model that emits BOS has begun a new
        # document (llama2.c's convention); EOT when the file declares one.
        stops = {bos, eos} | ({int(eot)} if eot is not None else set())
        special = {i for i, t in enumerate(types) if t == _GGUF_CONTROL} | {bos, eos}
        if unk is not None:
            special.add(int(unk))
        # A byte token's piece is <0xXX> in both formats; types confirm it in GGUF.
        for i, t in enumerate(types):
            if t == _GGUF_BYTE and not _BYTE_PIECE.fullmatch(pieces[i]):
                raise ValueError(f"{path}: byte token {i} has piece {pieces[i]!r}")
        return cls(pieces, scores, bos_id=bos, eos_id=eos, stop_ids=stops, special_ids=special)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids for ``text`` exactly as llama2.c's run.c ``encode`` makes them."""
        ids: list[int] = [self.bos_id] if bos else []
        if text:
            ids.extend(self._merge(self._initial(text)))
        if eos:
            ids.append(self.eos_id)
        return ids

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
    def piece_bytes(self, token_id: int, *, at_start: bool = False) -> bytes:
        """The bytes token ``token_id`` stands for; ``at_start`` (the first text piece, as
        after BOS in run.c) drops the dummy prefix's leading space."""
        if not 0 <= token_id < len(self._piece_bytes):
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        raw = self._piece_bytes[token_id]
        # run.c tests the stored piece, so a <0x20> byte token keeps its space.
        if at_start and self.pieces[token_id].startswith(b" "):
            return raw[1:]
        return raw

    def decode(self, ids: Iterable[int]) -> str:
        """Text for a whole sequence of ids (invalid UTF-8 becomes U+FFFD)."""
        dec = IncrementalDecoder(self)
        return dec.push_many(ids) + dec.flush()

    def decoder(self, context: Sequence[int] = ()) -> IncrementalDecoder:
        """A streaming decoder positioned after ``context`` (e.g. the prompt ids)."""
        dec = IncrementalDecoder(self)
        for t in context:
            dec.push(t)
        return dec

    def is_stop(self, token_id: int) -> bool:
        return token_id in self.stop_ids


class IncrementalDecoder:
    """Turns a stream of ids into text pieces; bytes of a UTF-8 character split across
    tokens are held back until the character is complete, so every piece is valid text.

    The first text piece (at the start or right after BOS) loses its dummy-prefix space.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True

    def push(self, token_id: int) -> str:
        tok = self._tok
        if token_id == tok.bos_id:
            self._at_start = True
            return ""
        raw = tok.piece_bytes(token_id, at_start=self._at_start)
        if token_id not in tok.special_ids:
            self._at_start = False
        return self._utf8.decode(raw)

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in ids)

    def flush(self) -> str:
        """Text for any bytes still held (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a llama2.c ``tokenizer.bin`` or from a ``.gguf`` model file."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_llama2c(path)
