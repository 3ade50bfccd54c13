"""Chat templates: llama.cpp's copies of real models' templates give each model's documented
turn format, the sandbox refuses templates that reach for Python's internals, a failing
template says why, and a model without a template keeps the plain "Role: content" lines."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from llmos.fixtures.llama_cpp_files import find_models_dir
from llmos.libllm import chat
from llmos.libllm.chat import ChatTemplateError
from llmos.libllm.tokenizer import load_tokenizer
from llmos.microkernel.errors import InvalidRequest, LlmosError

REPO = Path(__file__).resolve().parents[2]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there!"},
    {"role": "user", "content": "Who are you?"},
]

# Written from each model's documented chat format, not from the renderer's output.
LLAMA_3 = ("<|begin_of_text|>"
           "<|start_header_id|>system<|end_header_id|>\n\n"
           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
           "You are a helpful assistant.<|eot_id|>"
           "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\nHi there!<|eot_id|>"
           "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n")
CHATML = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "<|im_start|>user\nHello<|im_end|>\n"
          "<|im_start|>assistant\nHi there!<|im_end|>\n"
          "<|im_start|>user\nWho are you?<|im_end|>\n"
          "<|im_start|>assistant\n")
# Gemma has no system turn: the system text opens the first user turn.
GEMMA = ("<bos><start_of_turn>user\nYou are a helpful assistant.\n\nHello<end_of_turn>\n"
         "<start_of_turn>model\nHi there!<end_of_turn>\n"
         "<start_of_turn>user\nWho are you?<end_of_turn>\n"
         "<start_of_turn>model\n")

LLAMA_TOKENS: dict[str, Any] = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
QWEN_TOKENS: dict[str, Any] = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}  # Qwen's templates use neither
GEMMA_TOKENS: dict[str, Any] = {"bos_token": "<bos>", "eos_token": "<eos>"}


def models_dir() -> Path:
    """llama.cpp's models/ (templates/ and vocabulary GGUFs), where CI fetched it."""
    found = find_models_dir()
    if found is None or not (found / "templates").is_dir():
        pytest.skip(f"llama.cpp's chat templates are not here ({found or 'no models dir'}: set LLMOS_LLAMA_CPP_MODELS "
                    f"or run tools/fixtures/llama_cpp_files.py, which fetches them)")
    return found


def templates_dir() -> Path:
    return models_dir() / "templates"


def template(name: str) -> str:
    path = templates_dir() / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path.read_text()


@pytest.mark.parametrize(("name", "tokens", "kwargs", "expected"), [
    ("meta-llama-Llama-3.1-8B-Instruct", LLAMA_TOKENS, {}, LLAMA_3),
    ("meta-llama-Llama-3.2-3B-Instruct", LLAMA_TOKENS, {"date_string": "26 Jul 2024"}, LLAMA_3),
    ("Qwen-Qwen2.5-7B-Instruct", QWEN_TOKENS, {}, CHATML),
    ("Qwen-Qwen3-0.6B", QWEN_TOKENS, {}, CHATML),
    ("Qwen-Qwen3-0.6B", QWEN_TOKENS, {"enable_thinking": False}, CHATML + "<think>\n\n</think>\n\n"),
    ("google-gemma-2-2b-it", GEMMA_TOKENS, {}, GEMMA),  # its template refuses a system role: folded
])
def test_real_templates_give_the_models_documented_format(name: str, tokens: dict[str, Any],
                                                          kwargs: dict[str, Any], expected: str) -> None:
    assert chat.render(CONVERSATION, template(name), **tokens, **kwargs) == expected


def test_gemma_files_without_a_template_get_gemmas_turn_format() -> None:
    # The registry's Gemma 3 GGUF carries no template (nor does llama.cpp ship one for it):
    # the built-in one must give what Gemma 2's own template gives.
    from llmos.libllm.chat_builtin import BUILTIN_TEMPLATES

    builtin = chat.render(CONVERSATION, BUILTIN_TEMPLATES["gemma3"], **GEMMA_TOKENS)
    assert builtin == GEMMA == chat.render(CONVERSATION, template("google-gemma-2-2b-it"), **GEMMA_TOKENS)


def test_the_generation_prompt_is_the_assistants_header_only() -> None:
    text = chat.render(CONVERSATION, template("Qwen-Qwen2.5-7B-Instruct"), add_generation_prompt=False)
    assert text + "<|im_start|>assistant\n" == CHATML


def test_strftime_now_gives_llama_3_2_todays_date() -> None:
    before = datetime.now()
    text = chat.render(CONVERSATION, template("meta-llama-Llama-3.2-3B-Instruct"), **LLAMA_TOKENS)
    after = datetime.now()
    # Either side of midnight is right.
    assert text in {LLAMA_3.replace("26 Jul 2024", t.strftime("%d %b %Y")) for t in (before, after)}


def test_a_template_that_drops_system_messages_gets_them_in_the_first_user_turn() -> None:
    source = "{% for m in messages %}{% if m.role != 'system' %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
    assert chat.render(CONVERSATION, source) == ("<user>You are a helpful assistant.\n\nHello<assistant>Hi there!"
                                                 "<user>Who are you?")
    assert chat.render(CONVERSATION[:1], source) == "<user>You are a helpful assistant."


def test_text_parts_are_joined() -> None:
    parts = [{**m, "content": [{"type": "text", "text": "Who"}, {"type": "text", "text": "are you?"}]}
             if m["content"] == "Who are you?" else m for m in CONVERSATION]
    qwen = template("Qwen-Qwen2.5-7B-Instruct")
    assert chat.render(parts, qwen) == CHATML.replace("Who are you?", "Who\nare you?")
    with pytest.raises(InvalidRequest, match=r"messages\[1\].content: only"):
        chat.render([CONVERSATION[0], {"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                    qwen)


@pytest.mark.parametrize("messages", [[], "Hello", [{"content": "no role"}], [{"role": "user", "content": 3}]])
def test_malformed_messages_are_invalid_requests(messages: object) -> None:
    with pytest.raises(InvalidRequest, match="messages"):
        chat.render(messages, "{{ messages }}")  # type: ignore[arg-type]


def test_without_a_template_messages_become_role_lines() -> None:
    messages = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A dog"}]
    assert chat.render(messages, None) == "System: Tell stories.\nUser: A dog\nAssistant:"
    assert chat.render(messages, None, add_generation_prompt=False) == "System: Tell stories.\nUser: A dog"


def test_without_a_template_the_ids_are_the_plain_prompts() -> None:
    tokenizer = load_tokenizer(REPO / "servers" / "runner" / "models" / "tok512.bin")
    assert tokenizer.chat_template is None  # llama2.c's format has none
    messages = [{"role": "user", "content": "A dog"}]
    assert chat.prompt_ids(tokenizer, messages) == tokenizer.encode("User: A dog\nAssistant:")


@pytest.mark.parametrize(("vocab", "text"), [
    ("phi-3", "<s><|user|>\nHello<|end|>\n<|assistant|>\n"),  # begins with BOS's text: no second BOS
    ("qwen2", "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
              "<|im_start|>assistant\n"),
])
def test_prompt_ids_are_the_templates_text_with_special_tokens_parsed(vocab: str, text: str) -> None:
    path = models_dir() / f"ggml-vocab-{vocab}.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    tokenizer = load_tokenizer(path)
    messages = [{"role": "user", "content": "Hello"}]
    assert chat.render(messages, tokenizer.chat_template, bos_token=tokenizer.bos_token) == text
    ids = chat.prompt_ids(tokenizer, messages)
    has_bos = text.startswith(tokenizer.bos_token)
    assert ids == tokenizer.encode(text, bos=False if has_bos else None, parse_special=True)
    assert ids.count(tokenizer.bos_id) == (1 if has_bos or tokenizer.add_bos else 0)
    marker = "<|user|>" if vocab == "phi-3" else "<|im_start|>"
    (marker_id,) = tokenizer.encode(marker, bos=False, parse_special=True)
    assert marker_id in ids and tokenizer.decode(ids).count("Hello") == 1


@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages[0]['__class__'] }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{% set _ = messages.append(messages[0]) %}",  # the immutable sandbox: no mutating the caller's data
])
def test_the_sandbox_refuses_pythons_internals(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="unsafe"):
        chat.render(CONVERSATION, source)


def test_a_template_that_raises_gives_its_own_message() -> None:
    gemma = template("google-gemma-2-2b-it")
    turns = [{"role": "user", "content": "Hello"}, {"role": "user", "content": "Again"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate user/assistant/user/assistant"):
        chat.render(turns, gemma, **GEMMA_TOKENS)


@pytest.mark.parametrize(("source", "words"), [
    ("{% if %}", r"does not parse \(line 1\)"),
    ("{{ messages[0].content + 3 }}", "TypeError"),
    ("{{ 1 // 0 }}", "ZeroDivisionError"),
    ("{% for i in range(10 ** 9) %}{% endfor %}", "MAX_RANGE"),
])
def test_a_broken_template_is_a_clear_error(source: str, words: str) -> None:
    with pytest.raises(ChatTemplateError, match=words) as caught:
        chat.render(CONVERSATION, source)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, LlmosError)


def test_tojson_keeps_non_ascii_and_html_characters() -> None:
    source = "{{ messages[0] | tojson }}|{{ {'b': 1, 'a': [2]} | tojson(indent=1, sort_keys=true) }}"
    text = chat.render([{"role": "user", "content": "Café <b>&'"}], source)
    assert text == '{"role": "user", "content": "Café <b>&\'"}|{\n "a": [\n  2\n ],\n "b": 1\n}'


def test_blocks_are_trimmed_as_in_hf_transformers() -> None:
    source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert chat.render(CONVERSATION[1:], source) == "[Hello]\n[Who are you?]\n"


def test_the_generation_tag_renders_its_body() -> None:
    source = "{% for m in messages %}{% generation %}{{ m.role[0] }}{% endgeneration %}{% endfor %}"
    assert chat.render(CONVERSATION[1:], source) == "uau"
