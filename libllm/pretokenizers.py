"""The pre-tokenizer llama.cpp uses for each ``tokenizer.ggml.pre`` name of a byte-level BPE
("gpt2") vocabulary: the regexes of llm_tokenizer_bpe and the flags llama_vocab::impl::load
sets (src/llama-vocab.cpp, llama.cpp as vendored by llama-cpp-python 0.3.36).

The regexes apply in turn: each splits every piece the previous one left, and the text
between two matches stays a piece of its own (llama.cpp's unicode_regex_split; HF tokenizers'
Split with behavior "isolated"). Only names checked against llama.cpp's test vocabularies,
or sharing a checked regex, are here; any other name is refused rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PreTokenizer", "pre_tokenizer"]


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text before BPE merges, for one pre-tokenizer name.

    Attributes:
        regexes: applied in turn, each splitting the pieces the previous one left.
        ignore_merges: a piece that is itself a token is taken whole (Llama 3), not merged.
        add_bos: the BOS default when the file has no ``tokenizer.ggml.add_bos_token``.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_DEFAULT = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)
_GPT2 = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",)
_STARCODER = (r"\p{N}", *_GPT2)
_FALCON = (
    r"[\p{P}\$\+<=>\^~\|`]+",
    *_GPT2,
    r"[0-9][0-9][0-9]",
)
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_QWEN35 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
    r"|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# DeepSeek's classes list code points, spelled as escapes here so the source stays ASCII.
_CJK_KOREAN = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_KOREAN, r"\p{N}")
_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    "\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _CJK_KOREAN,
    r"\p{N}+",
)

_LLAMA3_FLAGS = PreTokenizer(_LLAMA3, ignore_merges=True, add_bos=True)
_NAMES: dict[tuple[str, ...], PreTokenizer] = {
    ("default",): PreTokenizer(_DEFAULT),
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
     "jina-v5-nano"): _LLAMA3_FLAGS,
    ("dbrx", "smaug-bpe"): PreTokenizer(_LLAMA3),
    ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
     "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling",
     "exaone4"): PreTokenizer(_GPT2),
    ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
     "mellum2"): PreTokenizer(_STARCODER),
    ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
     "solar-open", "grok-2"): PreTokenizer(_QWEN2),
    ("qwen35",): PreTokenizer(_QWEN35),
    ("falcon",): PreTokenizer(_FALCON),
    ("deepseek-llm",): PreTokenizer(_DEEPSEEK_LLM),
    ("deepseek-coder",): PreTokenizer(_DEEPSEEK_CODER),
}
_BY_NAME: dict[str, PreTokenizer] = {n: p for names, p in _NAMES.items() for n in names}


def pre_tokenizer(name: str) -> PreTokenizer | None:
    """llama.cpp's pre-tokenizer for ``name`` (no name means "default"), None if not known here."""
    return _BY_NAME.get(name or "default")
