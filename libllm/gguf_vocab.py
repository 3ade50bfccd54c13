"""A GGUF file's vocabulary as llama.cpp's loader sees it (llama_vocab::impl::load in
src/llama-vocab.cpp): the special ids and flags with its defaults per tokenizer kind, and
each token's attributes from its token type plus the overrides llama.cpp makes by token
text (end-of-generation and fill-in-the-middle pieces become control tokens, Phi-3's special
tokens strip the whitespace after them, ...). Tokenizers are built from this; it does no
tokenizing itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.libllm.chat_builtin import BUILTIN_TEMPLATES
from llmos.libllm.gguf_meta import read_metadata
from llmos.libllm.pretokenizers import PreTokenizer, pre_tokenizer

__all__ = [
    "ATTR_BYTE",
    "ATTR_CONTROL",
    "ATTR_LSTRIP",
    "ATTR_NORMAL",
    "ATTR_RSTRIP",
    "ATTR_UNKNOWN",
    "ATTR_UNUSED",
    "ATTR_USER_DEFINED",
    "GgufVocab",
    "decode_texts",
    "load_vocab",
]

# llama_token_attr bits
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# tokenizer.ggml.token_type (llama_token_type) -> attribute; anything else is "undefined" (0)
_TYPE_ATTR = {1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL, 4: ATTR_USER_DEFINED,
              5: ATTR_UNUSED, 6: ATTR_BYTE}

SUPPORTED_KINDS = ("llama", "gpt2")

# Pieces llama.cpp takes for end-of-turn / end-of-message / fill-in-the-middle ids when the
# file names none, in its order of preference (DeepSeek's bars are U+FF5C, spelled as escapes).
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend▁of▁sentence\uff5c>",
              "<end_of_utterance>")
_FIM_TEXTS: dict[str, tuple[str, ...]] = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim▁begin\uff5c>", "<PRE>",
            "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim▁hole\uff5c>", "<SUF>",
            "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim▁end\uff5c>", "<MID>",
            "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_FIM_OLD_KEYS = {"pre": "prefix_token_id", "suf": "suffix_token_id", "mid": "middle_token_id"}
# Pieces llama.cpp treats as end of generation (and so as control tokens), whatever their type.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
              "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
              "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
              "<turn|>", "<|tool_response>", "<\uff5cend▁of▁sentence\uff5c>", "[e~[")
# The end-of-turn pieces that stop generation here (with EOS and the file's EOT/EOM ids).
_STOP_TEXTS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>",
               "<|eom_id|>")


@dataclass(frozen=True, eq=False)
class GgufVocab:
    """What a tokenizer needs from a GGUF file, with llama.cpp's defaults applied.

    ``tokens`` are the raw token texts (bytes: GGUF does not promise UTF-8); ``attrs`` are
    llama.cpp token attribute bits (ATTR_*); ``stop_ids`` are EOS, the file's EOT/EOM ids, the
    end-of-turn pieces present as control tokens and, for SentencePiece, BOS (llama2.c's
    convention, kept for the GGUF copies of its models).
    """

    path: str
    kind: str
    pre: PreTokenizer | None
    tokens: list[bytes]
    scores: list[float]
    attrs: list[int]
    merges: list[bytes]
    bos_id: int
    eos_id: int
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    stop_ids: frozenset[int]
    chat_template: str | None

    def texts(self) -> list[str]:
        return decode_texts(self.tokens)

    def tokenizer_arguments(self, texts: list[str]) -> dict[str, Any]:
        """The Tokenizer settings every GGUF vocabulary kind takes from the file alike."""
        from llmos.libllm.special import SpecialTokens  # special.py reads this module's ATTR_* bits

        return {
            "bos_id": self.bos_id, "eos_id": self.eos_id, "stop_ids": self.stop_ids,
            "bos_token": texts[self.bos_id], "eos_token": texts[self.eos_id],
            "add_bos": self.add_bos, "add_eos": self.add_eos,
            "specials": SpecialTokens(texts, self.attrs), "chat_template": self.chat_template,
        }


def decode_texts(raw: Sequence[bytes]) -> list[str]:
    """Token texts as str; bytes that are not UTF-8 survive as surrogate escapes. One join
    and split instead of a decode per token (262,144 tokens in milliseconds)."""
    joined = b"\x00".join(raw).decode("utf-8", errors="surrogateescape").split("\x00")
    if len(joined) == len(raw):
        return joined
    return [t.decode("utf-8", errors="surrogateescape") for t in raw]  # a token holds NUL


def _flag(meta: dict[str, Any], key: str, default: bool) -> bool:
    v = meta.get(key)
    return default if v is None else bool(v)


def load_vocab(path: str | Path) -> GgufVocab:
    """The vocabulary of the GGUF file at ``path``.

    Raises:
        ValueError: the file has no vocabulary, or one of a kind (``tokenizer.ggml.model``)
            or pre-tokenizer (``tokenizer.ggml.pre``) this library does not implement.
    """
    meta = read_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_KINDS:
        raise ValueError(f"{path}: tokenizer kind {kind!r} (tokenizer.ggml.model) is not supported; "
                         f"supported: {', '.join(SUPPORTED_KINDS)}")
    tokens: list[bytes] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens")
    n = len(tokens)
    if b"" in tokens:  # llama.cpp renames empty tokens
        tokens = [t or f"[EMPTY_{i}]".encode() for i, t in enumerate(tokens)]
    pre: PreTokenizer | None = None
    if kind == "gpt2":
        name = str(meta.get("tokenizer.ggml.pre", ""))
        pre = pre_tokenizer(name)
        if pre is None:
            raise ValueError(f"{path}: pre-tokenizer {name!r} (tokenizer.ggml.pre) of tokenizer kind "
                             f"'gpt2' is not supported")
        if "tokenizer.ggml.merges" not in meta:
            raise ValueError(f"{path}: tokenizer kind 'gpt2' without tokenizer.ggml.merges")
    scores = [float(s) for s in meta.get("tokenizer.ggml.scores") or [0.0] * n]
    types = meta.get("tokenizer.ggml.token_type") or [1] * n
    if len(scores) < n or len(types) < n:
        raise ValueError(f"{path}: fewer scores or token types than tokens")
    attrs = [_TYPE_ATTR.get(t, 0) for t in types[:n]]
    # token_to_id: the last of repeated texts wins, as in llama.cpp's map assignment.
    ids = {t: i for i, t in enumerate(tokens)}

    def special_id(key: str, default: int | None) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and 0 <= int(v) < n:
            return int(v)
        return default if default is not None and 0 <= default < n else None

    # llama.cpp's defaults: SentencePiece <unk>=0 <s>=1 </s>=2; BPE 11 for both (GPT-NeoX).
    spm = kind == "llama"
    bos = special_id("bos_token_id", 1 if spm else 11)
    eos = special_id("eos_token_id", 2 if spm else 11)
    if bos is None or eos is None:
        raise ValueError(f"{path}: no BOS or EOS token id in range [0, {n})")
    unk = special_id("unknown_token_id", 0 if spm else None)
    eot = special_id("eot_token_id", None)
    eom = special_id("eom_token_id", None)

    def make_control(text: str) -> int | None:
        i = ids.get(text.encode("utf-8"))
        if i is not None:
            attrs[i] |= ATTR_CONTROL
        return i

    # Auto-detected ids become control tokens (llama.cpp scans an unordered map, so with
    # several candidates present its pick is arbitrary; this takes the first in its list).
    if eot is None:
        eot = next((i for i in map(make_control, _EOT_TEXTS) if i is not None), None)
    if eom is None:
        eom = make_control("<|eom_id|>")
    for fim, texts in _FIM_TEXTS.items():
        old = _FIM_OLD_KEYS.get(fim)  # the deprecated key for the same id
        if special_id(f"fim_{fim}_token_id", None) is None and (
                old is None or special_id(old, None) is None):
            next((i for i in map(make_control, texts) if i is not None), None)
    eog = {i for i in map(make_control, _EOG_TEXTS) if i is not None}
    _apply_name_hacks(meta, ids, attrs, eog)

    stops = {eos} | {i for i in (eot, eom) if i is not None}
    stops |= {i for t in _STOP_TEXTS if (i := ids.get(t.encode())) is not None
              and attrs[i] & ATTR_CONTROL}
    if spm:
        stops.add(bos)  # llama2.c's convention: a SentencePiece model emitting BOS starts anew
    add_bos_default = spm or (pre is not None and pre.add_bos)
    template = meta.get("tokenizer.chat_template")
    if not isinstance(template, str):
        template = BUILTIN_TEMPLATES.get(str(meta.get("general.architecture")))
    return GgufVocab(
        path=str(path), kind=kind, pre=pre, tokens=tokens, scores=scores[:n], attrs=attrs,
        merges=meta.get("tokenizer.ggml.merges") or [],
        bos_id=bos, eos_id=eos, unk_id=unk,
        add_bos=_flag(meta, "tokenizer.ggml.add_bos_token", add_bos_default),
        add_eos=_flag(meta, "tokenizer.ggml.add_eos_token", False),
        add_space_prefix=_flag(meta, "tokenizer.ggml.add_space_prefix", spm),
        stop_ids=frozenset(stops),
        chat_template=template,
    )


def _apply_name_hacks(meta: dict[str, Any], ids: dict[bytes, int], attrs: list[int],
                      eog: set[int]) -> None:
    """llama.cpp's per-model attribute fixes, keyed by token text and model name."""

    def at(text: str) -> int | None:
        return ids.get(text.encode("utf-8"))

    # gpt-oss: these always render, as user-defined tokens.
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
        if (i := at(text)) is not None:
            attrs[i] = ATTR_USER_DEFINED
    present = {t for t in ("<|return|>", "<|call|>", "<|calls|>", "<|flush|>", "<|end|>",
                           "<|tool_response>", "<|plamo:eos|>", "</s>")
               if (i := at(t)) is not None and i in eog}
    # o200k_harmony / solar-open: <|end|> ends a message, not generation.
    if "<|end|>" in present and (
            {"<|return|>", "<|call|>"} <= present or {"<|calls|>", "<|flush|>"} <= present):
        end = at("<|end|>")
        assert end is not None
        attrs[end] = ATTR_USER_DEFINED
    # gemma4 / plamo: </s> is an ordinary token.
    if "</s>" in present and present & {"<|tool_response>", "<|plamo:eos|>"}:
        s = at("</s>")
        assert s is not None
        attrs[s] = ATTR_NORMAL

    name = str(meta.get("general.name", "")).lower()
    pre = str(meta.get("tokenizer.ggml.pre", ""))
    arch = str(meta.get("general.architecture", ""))
    if any(p in pre for p in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
            a in arch for a in ("nomic-bert-moe", "jina-bert-v3")):
        if (i := at("<mask>")) is not None:
            attrs[i] |= ATTR_LSTRIP
    elif "phi-3" in name or "phi3" in name:
        # Phi-3's special tokens eat the whitespace after them, except these three.
        special = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
        for i, a in enumerate(attrs):
            if a & special:
                attrs[i] = a | ATTR_RSTRIP
        if (i := at("</s>")) is not None:
            attrs[i] |= ATTR_RSTRIP
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            if (i := at(text)) is not None:
                attrs[i] &= ~ATTR_RSTRIP
    elif "modern-bert" in name and (i := at("[MASK]")) is not None:
        attrs[i] |= ATTR_LSTRIP
