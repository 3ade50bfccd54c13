"""The tokenizer clients use: text to ids and ids back to text, for one model's vocabulary.

Runs in client processes (libllm): clients tokenize and detokenize, servers move ids only.
``load_tokenizer`` reads a llama2.c ``tokenizer.bin`` (run.c's SentencePiece merges,
libllm.llama2c) or a GGUF model file: kind "llama" (SentencePiece BPE as llama.cpp does it,
libllm.spm) or "gpt2" (byte-level BPE on HF tokenizers, libllm.bpe). Every kind is a
``Tokenizer``: one interface, with special tokens split out as llama.cpp does and decoding
by bytes per token, so a stream never splits a UTF-8 character. Nothing here does I/O
beyond reading the vocabulary file once.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from pathlib import Path

from llmos.libllm.special import SpecialTokens

__all__ = ["IncrementalDecoder", "Tokenizer", "load_tokenizer"]


class Tokenizer:
    """One model's vocabulary: ``encode`` text to ids, ``decode`` ids to text.

    A base for the vocabulary kinds, which supply ``_encode_fragment``.

    Args:
        piece_bytes: the bytes each token id decodes to (empty for control tokens).
        bos_id, eos_id: the begin/end-of-sequence ids.
        stop_ids: ids that end generation.
        special_ids: ids that decode to nothing (control, unknown and unused tokens).
        bos_token, eos_token: the texts of BOS and EOS (for chat templates).
        add_bos, add_eos: whether ``encode`` adds BOS/EOS by default (the file's
            ``tokenizer.ggml.add_bos_token``/``add_eos_token``).
        space_prefix: text gets a leading space when tokenized, which decoding drops again
            from the first text piece (SentencePiece's dummy prefix).
        specials: the special tokens split out of text before tokenizing it.
        chat_template: the model's Jinja chat template, if the file has one.
    """

    def __init__(
        self,
        piece_bytes: Sequence[bytes],
        *,
        bos_id: int,
        eos_id: int,
        stop_ids: Iterable[int],
        special_ids: Iterable[int],
        bos_token: str,
        eos_token: str,
        add_bos: bool,
        add_eos: bool = False,
        space_prefix: bool = False,
        specials: SpecialTokens | None = None,
        chat_template: str | None = None,
    ) -> None:
        if not piece_bytes:
            raise ValueError("a vocabulary needs at least one token")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids: frozenset[int] = frozenset(stop_ids)
        self.special_ids: frozenset[int] = frozenset(special_ids)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.space_prefix = space_prefix
        self.chat_template = chat_template
        self._specials = specials if specials is not None and len(specials) else None
        self._piece_bytes: list[bytes] = list(piece_bytes)
        for i in self.special_ids:
            self._piece_bytes[i] = b""

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return len(self._piece_bytes)

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, *, bos: bool | None = None, eos: bool | None = False,
               parse_special: bool = False) -> list[int]:
        """Token ids for ``text``.

        Args:
            bos: add BOS first; None: as the vocabulary says (``add_bos``).
            eos: add EOS last; None: as the vocabulary says (``add_eos``).
            parse_special: control tokens written in ``text`` (e.g. ``<|im_end|>``) become
                their ids; otherwise they are tokenized as plain text. User-defined tokens
                are always split out, as llama.cpp does.
        """
        ids: list[int] = [self.bos_id] if (self.add_bos if bos is None else bos) else []
        if text:
            if self._specials is None:
                ids.extend(self._encode_fragment(text, True))
            else:
                after_special = True  # the first fragment counts as following a special token
                for frag in self._specials.partition(text, parse_special=parse_special):
                    if isinstance(frag, int):
                        ids.append(frag)
                        after_special = True
                    else:
                        ids.extend(self._encode_fragment(frag, after_special))
                        after_special = False
        if self.add_eos if eos is None else eos:
            ids.append(self.eos_id)
        return ids

    def _encode_fragment(self, text: str, after_special: bool) -> list[int]:
        """Ids for a non-empty piece of text holding no special token; ``after_special``: it
        starts the text or follows a special token (SentencePiece adds its space prefix)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ decoding
    def piece_bytes(self, token_id: int, *, at_start: bool = False) -> bytes:
        """The bytes token ``token_id`` stands for; ``at_start`` (the first text piece, as
        after BOS) drops the leading space the space prefix put there."""
        if not 0 <= token_id < len(self._piece_bytes):
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        raw = self._piece_bytes[token_id]
        if at_start and self.space_prefix and self._starts_with_prefix_space(token_id):
            return raw[1:]
        return raw

    def _starts_with_prefix_space(self, token_id: int) -> bool:
        return self._piece_bytes[token_id][:1] == b" "

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


class IncrementalDecoder:
    """Turns a stream of ids into text pieces; bytes of a UTF-8 character split across
    tokens are held back until the character is complete, so every piece is valid text.

    With a space prefix, the first text piece (at the start or right after BOS) loses it.
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
    """A tokenizer from a llama2.c ``tokenizer.bin`` or from a ``.gguf`` model file.

    Raises:
        ValueError: a malformed file, or a GGUF vocabulary of a kind not supported here
            (the message names the file and the kind).
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    # Each kind imports its own dependencies: a llama2.c client never loads HF tokenizers.
    if magic != b"GGUF":
        from llmos.libllm.llama2c import Llama2cTokenizer

        return Llama2cTokenizer.from_file(path)
    from llmos.libllm.gguf_vocab import load_vocab

    vocab = load_vocab(path)
    if vocab.kind == "gpt2":
        from llmos.libllm.bpe import BpeTokenizer

        return BpeTokenizer(vocab)
    from llmos.libllm.spm import SpmTokenizer

    return SpmTokenizer(vocab)
