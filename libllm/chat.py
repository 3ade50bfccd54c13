"""Chat templates: a conversation turned into the text its model was trained to continue.

Runs in the client's process (libllm; the gateway through its session). Renders the model's
own template (a Jinja2 string, GGUF `tokenizer.chat_template`) in jinja2's immutable
sandbox, set up as HF transformers and vLLM set it up; a model without one gets plain
"Role: content" lines. Pure: no I/O, and only the template is ever compiled (message text is
data). `prompt_ids` then encodes the text with the tokenizer, special tokens included.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmos.libllm.tokenizer import Tokenizer
from llmos.microkernel.errors import InvalidRequest, LlmosError

__all__ = ["ChatTemplateError", "prompt_ids", "render"]

Messages = Sequence[Mapping[str, Any]]

_SYSTEM_NEEDLE = "<llmos system probe>"


class ChatTemplateError(LlmosError, ValueError):
    """The model's chat template failed on this conversation; the message is the template's
    own (e.g. "System role not supported") or says where it broke."""


def render(messages: Messages, chat_template: str | None, *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **kwargs: Any) -> str:
    """The prompt text for `messages` (each {"role", "content"}, content a str or a list of
    {"type": "text", "text"} parts, joined by newlines; other keys go to the template as
    they are). `kwargs` reach the template too (e.g. `enable_thinking`, `date_string`).

    Without a template: one "Role: content" line per message, then "Assistant:" when
    `add_generation_prompt`. A template that rejects system messages (Gemma 2) gets them
    folded into the next user turn, as llama.cpp's server does.

    Raises:
        InvalidRequest: a message that is not {"role": str, "content": str or text parts}.
        ChatTemplateError: the template does not parse, refuses the conversation
            (`raise_exception`), or fails while rendering.
    """
    plain = _plain_messages(messages)
    if chat_template is None:
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in plain]
        return "\n".join([*lines, "Assistant:"] if add_generation_prompt else lines)
    template = _compile(chat_template)
    if not _supports_system_role(chat_template):
        plain = _fold_system_messages(plain)
    return _render(template, messages=plain, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                   eos_token=eos_token, **kwargs)


def prompt_ids(tokenizer: Tokenizer, messages: Messages, *, add_generation_prompt: bool = True,
               **kwargs: Any) -> list[int]:
    """Token ids of `render` with the tokenizer's template and special tokens.

    A template's text names its control tokens (<|im_start|>, <start_of_turn>), so it is
    encoded with special tokens parsed; it usually begins with the BOS token's text itself,
    and then the tokenizer adds none (llama.cpp's server makes the same check). Without a
    template the lines are encoded as a plain prompt is.
    """
    if tokenizer.chat_template is None:
        return tokenizer.encode(render(messages, None, add_generation_prompt=add_generation_prompt))
    bos_token = tokenizer.bos_token
    text = render(messages, tokenizer.chat_template, add_generation_prompt=add_generation_prompt,
                  bos_token=bos_token, eos_token=tokenizer.eos_token, **kwargs)
    has_bos = bool(bos_token) and text.startswith(bos_token)
    return tokenizer.encode(text, bos=False if has_bos else None, parse_special=True)


# -- internals ------------------------------------------------------------------------------


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        # jinja2's sandbox answers with an Undefined that renders as "", which hides the
        # attempt (`{{ ''.__class__ }}` would print nothing): refuse it out loud instead.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: HF transformers marks the assistant's text
    with it for training masks; rendering needs only the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# trim_blocks and lstrip_blocks: templates are written for them (HF transformers, vLLM).
_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation])
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise_exception
_ENV.globals["strftime_now"] = _strftime_now


@functools.lru_cache(maxsize=16)
def _compile(chat_template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(chat_template)
    except TemplateError as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, jinja2.TemplateSyntaxError) else ""
        raise ChatTemplateError(f"the chat template does not parse{where}: {exc}") from exc


def _render(template: jinja2.Template, **context: Any) -> str:
    try:
        return template.render(**context)
    except TemplateError as exc:  # raise_exception, an unsafe attribute, an undefined name
        raise ChatTemplateError(f"chat template: {exc}") from exc
    except Exception as exc:  # the template's own bug (e.g. str + None): still the template's failure
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc


@functools.lru_cache(maxsize=16)
def _supports_system_role(chat_template: str) -> bool:
    """Whether a system message survives the template (llama.cpp probes the same way):
    some refuse one (Gemma 2's raise_exception), some drop it."""
    probe = [{"role": "system", "content": _SYSTEM_NEEDLE}, {"role": "user", "content": "Hi"}]
    try:
        return _SYSTEM_NEEDLE in _render(_compile(chat_template), messages=probe, add_generation_prompt=False,
                                         bos_token="", eos_token="")
    except ChatTemplateError:
        return False


def _fold_system_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System text goes at the head of the next user turn, blank-line separated as Gemma 3's
    own template (and llama.cpp's built-in Gemma format) puts it; a system message with no
    user turn after it becomes one."""
    out: list[dict[str, Any]] = []
    held: list[str] = []
    for message in messages:
        if message["role"] == "system":
            held.append(message["content"])
        elif message["role"] == "user" and held:
            out.append({**message, "content": "\n\n".join([*held, message["content"]])})
            held = []
        else:
            out.append(message)
    if held:
        out.append({"role": "user", "content": "\n\n".join(held)})
    return out


def _plain_messages(messages: object) -> list[dict[str, Any]]:
    """Copies with str content (text parts joined), checked: the template sees only data."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {\"role\", \"content\"} mappings")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be a mapping with a str \"role\", got {message!r}")
        out.append({**message, "content": _text(message.get("content"), i)})
    return out


def _text(content: Any, i: int) -> str:
    if content is None:  # an assistant turn of only tool calls has none
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes):
        pieces = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"messages[{i}].content: only {{\"type\": \"text\", \"text\": str}} parts are "
                                     f"supported, got {part!r}")
            pieces.append(part["text"])
        return "\n".join(pieces)  # as llama.cpp's server and vLLM join them
    raise InvalidRequest(f"messages[{i}].content must be a str or a list of text parts, got "
                         f"{type(content).__name__}")
