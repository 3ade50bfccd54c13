"""GGUF tokenizers against llama.cpp: every case of llama.cpp's test vocabularies
(models/ggml-vocab-*.gguf with .inp/.out, what its tests/test-tokenizer-0.cpp checks) gives
llama.cpp's ids; special tokens, stop ids and flags are llama.cpp's; text round-trips; the
streaming decoder never splits a character; the fast GGUF reader agrees with gguf-py's.

llama.cpp's files come from tools/fixtures/llama_cpp_files.py ($LLMOS_LLAMA_CPP_MODELS in CI);
without them those tests skip.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos.fixtures.llama_cpp_files import find_models_dir
from llmos.libllm.chat_builtin import BUILTIN_TEMPLATES
from llmos.libllm.gguf_meta import read_metadata
from llmos.libllm.tokenizer import Tokenizer, load_tokenizer
from tests.models import gemma3_270m

# Every llama.cpp test vocabulary of the two supported kinds: name -> tokenizer.ggml.model.
VOCABS = {
    "llama-spm": "llama", "phi-3": "llama",
    "llama-bpe": "gpt2", "qwen2": "gpt2", "qwen35": "gpt2", "gpt-2": "gpt2", "mpt": "gpt2",
    "starcoder": "gpt2", "refact": "gpt2", "command-r": "gpt2", "falcon": "gpt2",
    "deepseek-llm": "gpt2", "deepseek-coder": "gpt2",
}
UNSUPPORTED = {"bert-bge": "bert", "gemma-4": "gemma4", "nomic-bert-moe": "t5"}

TEXTS = [
    "Hello world",
    " leading space, and  two  doubles ",
    "Café naïve résumé, Straße, Ærø",
    "Emoji: 🙂🚀 👩‍👩‍👧 🦙.cpp",
    "日本語のテキスト and 中文 and Кириллица and កាន់តែពិសេស",
    "tab\tnew\nline\r\ncarriage\n\n\n",
    "code:\n    if x == 3333:\n        return y  # done",
    "x\u0301 combining, \u00a0nbsp, zero\u200bwidth",
    "<|endoftext|> and </s> written as text",
]


def models_dir() -> Path:
    found = find_models_dir()
    if found is None:
        pytest.skip("llama.cpp's test vocabularies are not here: set LLMOS_LLAMA_CPP_MODELS or run "
                    "tools/fixtures/llama_cpp_files.py (it downloads llama-cpp-python's sdist)")
    return found


def vocab_path(name: str) -> Path:
    return models_dir() / f"ggml-vocab-{name}.gguf"


@functools.cache
def tokenizer(name: str) -> Tokenizer:
    return load_tokenizer(vocab_path(name))


def read_cases(gguf: Path) -> dict[str, list[int]]:
    """test-tokenizer-0.cpp's read_tests: inputs split on "\\n__ggml_vocab_test__\\n" (text
    after the last separator is one more input), one line of ids per input; a std::map, so
    a repeated input keeps its last ids."""
    raw = gguf.with_name(gguf.name + ".inp").read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    lines = gguf.with_name(gguf.name + ".out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # getline sees no line after the final newline
    assert len(lines) == len(inputs), f"{gguf.name}: {len(inputs)} inputs, {len(lines)} outputs"
    return {s: [int(t) for t in line.split()] for s, line in zip(inputs, lines, strict=True)}


# ---------------------------------------------------------------------- llama.cpp's test vectors
@pytest.mark.parametrize("name", VOCABS)
def test_every_llama_cpp_case(name: str) -> None:
    cases = read_cases(vocab_path(name))
    assert len(cases) >= 40
    tok = tokenizer(name)
    # test-tokenizer-0: common_tokenize(ctx, text, add_special=false, parse_special=false)
    wrong = {text: (want, got) for text, want in cases.items()
             if (got := tok.encode(text, bos=False, eos=False, parse_special=False)) != want}
    detail = "\n".join(f"  {t!r}: llama.cpp {w}, here {g}" for t, (w, g) in list(wrong.items())[:5])
    assert not wrong, f"{name}: {len(cases) - len(wrong)}/{len(cases)} cases equal\n{detail}"


@pytest.mark.parametrize(("name", "kind"), UNSUPPORTED.items())
def test_other_kinds_are_refused_by_name(name: str, kind: str) -> None:
    path = vocab_path(name)
    with pytest.raises(ValueError, match=f"{path}.*'{kind}'"):
        load_tokenizer(path)


# Recorded from llama.cpp 0.3.36's llama_tokenize (libllama): (text, add_special, parse_special).
SPECIAL_CASES: list[tuple[str, str, bool, bool, list[int]]] = [
    # Control tokens split out only when asked; BOS before them as the vocabulary says.
    ("llama-bpe", "<|begin_of_text|>Hello<|eot_id|>", False, True, [128000, 9906, 128009]),
    ("llama-bpe", "<|begin_of_text|>Hello<|eot_id|>", False, False,
     [27, 91, 7413, 3659, 4424, 91, 29, 9906, 27, 91, 68, 354, 851, 91, 29]),
    ("llama-bpe", "Hello", True, False, [128000, 9906]),
    ("qwen2", "<|im_start|>user\nHi<|im_end|>\n", False, True, [151644, 872, 198, 13048, 151645, 198]),
    ("qwen2", "<|im_start|>user\nHi<|im_end|>\n", False, False,
     [27, 91, 318, 4906, 91, 29, 872, 198, 13048, 27, 91, 318, 6213, 91, 397]),
    # User-defined tokens are split out even without parse_special.
    ("command-r", "a<|USER_TOKEN|>b", False, False, [72, 255006, 73]),
    ("command-r", "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|>", True, True,
     [5, 255000, 255006, 37535, 255001]),
    # SentencePiece: the space prefix again after each special token.
    ("llama-spm", "<s>Hello</s> world", True, True, [1, 1, 15043, 2, 29871, 3186]),
    ("llama-spm", " Hello", True, False, [1, 29871, 15043]),
    # Phi-3's special tokens take the whitespace after them (llama.cpp's RSTRIP for "phi3");
    # its user-defined </s> counts as control, as llama.cpp makes every end-of-generation piece.
    ("phi-3", "<|user|>\nHi<|end|>\n<|assistant|>", True, True, [1, 32010, 6324, 32007, 32001]),
    ("phi-3", "<|user|>  Hi", False, True, [32010, 6324]),
    ("phi-3", "</s> x", False, False, [1533, 29879, 29958, 921]),
    ("phi-3", "</s> x", False, True, [2, 921]),
]


@pytest.mark.parametrize(("name", "text", "add_special", "parse_special", "expected"), SPECIAL_CASES)
def test_special_tokens_as_llama_cpp(name: str, text: str, add_special: bool, parse_special: bool,
                                     expected: list[int]) -> None:
    # add_special is llama.cpp's "as the vocabulary says" for both BOS and EOS.
    flag = None if add_special else False
    assert tokenizer(name).encode(text, bos=flag, eos=flag, parse_special=parse_special) == expected


# name: (bos, eos, bos_token, eos_token, add_bos, stop ids, has a chat template)
FACTS: dict[str, tuple[int, int, str, str, bool, set[int], bool]] = {
    "llama-spm": (1, 2, "<s>", "</s>", True, {1, 2}, False),
    "phi-3": (1, 32000, "<s>", "<|endoftext|>", True, {1, 32000, 32007}, True),  # 32007 <|end|>
    "llama-bpe": (128000, 128001, "<|begin_of_text|>", "<|end_of_text|>", True, {128001, 128009}, False),
    "qwen2": (151643, 151643, "<|endoftext|>", "<|endoftext|>", False, {151643, 151645}, True),
    "gpt-2": (50256, 50256, "<|endoftext|>", "<|endoftext|>", False, {50256}, False),
    "command-r": (5, 255001, "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", True, {255001}, True),
}


@pytest.mark.parametrize("name", FACTS)
def test_special_ids_flags_and_template(name: str) -> None:
    tok = tokenizer(name)
    bos, eos, bos_token, eos_token, add_bos, stops, has_template = FACTS[name]
    assert (tok.bos_id, tok.eos_id, tok.bos_token, tok.eos_token) == (bos, eos, bos_token, eos_token)
    assert tok.add_bos is add_bos and not tok.add_eos
    assert tok.stop_ids == stops
    assert (tok.chat_template is not None) is has_template
    if has_template:
        assert isinstance(tok.chat_template, str) and "{%" in tok.chat_template
    assert tok.vocab_size == len(read_metadata(vocab_path(name))["tokenizer.ggml.tokens"])
    ids = tok.encode("Hi")
    assert (ids[0] == bos) is add_bos
    assert tok.encode("Hi", bos=True, eos=True) == [bos, *tok.encode("Hi", bos=False), eos]
    assert tok.decode([bos, eos]) == ""  # control tokens decode to nothing


# ---------------------------------------------------------------------- decoding
@pytest.mark.parametrize("name", VOCABS)
def test_round_trip(name: str) -> None:
    tok = tokenizer(name)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text, text
        assert tok.decode(tok.encode(text, bos=False)) == text, text


@pytest.mark.parametrize(("name", "alphabet"), [
    ("gpt-2", st.characters(exclude_categories=("Cs",))),
    ("qwen2", st.characters(exclude_categories=("Cs",))),
    # SentencePiece decodes U+2581 as a space, so it cannot come back as itself.
    ("llama-spm", st.characters(exclude_categories=("Cs",), exclude_characters="\u2581")),
])
def test_any_text_round_trips(name: str, alphabet: st.SearchStrategy[str]) -> None:
    tok = tokenizer(name)

    @settings(max_examples=150, deadline=None)
    @given(st.text(alphabet, max_size=40))
    def check(text: str) -> None:
        assert tok.decode(tok.encode(text)) == text

    check()


@pytest.mark.parametrize("name", ["llama-bpe", "gpt-2", "qwen2"])
def test_streaming_holds_characters_split_across_byte_level_tokens(name: str) -> None:
    tok = tokenizer(name)
    text = "🦙 and 語 and é, កាន់តែ 👩‍👩‍👧"
    ids = tok.encode(text, bos=False)
    dec = tok.decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    # The text really splits characters across tokens: some tokens are not UTF-8 alone.
    split = [i for i in ids if not _is_utf8(tok.piece_bytes(i))]
    assert split
    assert "" in pieces  # ...and their first bytes were held back


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_streaming_after_a_prompt_keeps_spaces() -> None:
    tok = tokenizer("llama-bpe")
    dec = tok.decoder(tok.encode("Hello"))
    assert dec.push(tok.encode(" world", bos=False)[0]) == " world"
    spm = tokenizer("llama-spm")
    assert spm.decoder(spm.encode("Hello")).push(spm.encode("world", bos=False)[0]) == " world"
    # ...while the first text piece loses SentencePiece's space prefix.
    assert spm.decoder().push_many(spm.encode("world")) == "world"


# ---------------------------------------------------------------------- the GGUF reader
def _reference_fields(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(path)
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the reader's own header fields
        values = [f.parts[i] for i in f.data]
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                out[key] = [bytes(v) for v in values]
            else:
                out[key] = [v.tolist()[0] for v in values]
        elif f.types[0] == gguf.GGUFValueType.STRING:
            out[key] = bytes(values[0]).decode("utf-8")
        else:
            out[key] = values[0].tolist()[0]
    return out


def test_metadata_reader_agrees_with_gguf_py(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "all-types.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**63)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁ world")
    w.add_array("t.strs", ["a", "", "▁b", "日本"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = read_metadata(path)
    assert meta == _reference_fields(path)
    assert meta["t.strs"] == [b"a", b"", "▁b".encode(), "日本".encode()]
    assert meta["t.f64"] == 0.1 and meta["t.bool"] is True


def test_metadata_reader_agrees_on_a_real_vocabulary() -> None:
    path = vocab_path("llama-spm")
    meta = read_metadata(path)
    assert meta == _reference_fields(path)
    assert len(meta["tokenizer.ggml.tokens"]) == 32000


def test_refuses_what_is_not_a_vocabulary(tmp_path: Path) -> None:
    import gguf

    def write(name: str, model: str | None, pre: str | None) -> Path:
        path = tmp_path / name
        w = gguf.GGUFWriter(path, "llama")
        if model is not None:
            w.add_tokenizer_model(model)
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(["a", "b", "ab"])
        w.add_token_merges(["a b"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    unknown_pre = write("pre.gguf", "gpt2", "kimi-k2")
    with pytest.raises(ValueError, match=f"{unknown_pre}.*'kimi-k2'"):
        load_tokenizer(unknown_pre)
    rwkv = write("rwkv.gguf", "rwkv", None)
    with pytest.raises(ValueError, match=f"{rwkv}.*'rwkv'"):
        load_tokenizer(rwkv)
    none = write("none.gguf", None, None)
    with pytest.raises(ValueError, match=f"{none}.*None"):
        load_tokenizer(none)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(unknown_pre.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated"):
        load_tokenizer(truncated)


# ---------------------------------------------------------------------- Gemma 3, if present
@pytest.fixture(scope="module")
def gemma() -> Tokenizer:
    return load_tokenizer(gemma3_270m())


def test_gemma3_vocabulary(gemma: Tokenizer) -> None:
    assert gemma.vocab_size == 262_144 and not gemma.space_prefix
    assert (gemma.bos_id, gemma.bos_token, gemma.eos_id, gemma.eos_token) == (2, "<bos>", 1, "<eos>")
    assert gemma.stop_ids == {1, 2, 106}  # <eos>, <bos> (SentencePiece), <end_of_turn>
    assert gemma.chat_template is BUILTIN_TEMPLATES["gemma3"]  # the file has none
    # Recorded from llama.cpp 0.3.36: its user-defined whitespace and HTML tokens always split
    # out; </s> is user-defined but, as an end-of-generation piece, parsed only on request.
    assert gemma.encode("<start_of_turn>user\nHello  world<end_of_turn>\n", parse_special=True) == [
        2, 105, 2364, 107, 9259, 138, 12392, 106, 107]
    assert gemma.encode("a</s>b <table>x\t\ty") == [
        2, 236746, 954, 236751, 236813, 236763, 236743, 168, 236781, 255969, 236762]
    assert gemma.encode("a</s>b", bos=False, parse_special=True) == [236746, 212, 236763]
    for text in TEXTS[:-1]:  # not the last: Gemma's </s> decodes to nothing, as in llama.cpp
        assert gemma.decode(gemma.encode(text)) == text
