"""Chat templates for model families whose GGUF files often carry none.

A GGUF converted without its tokenizer_config (the Gemma 3 270M file the registry ships is
one) has no `tokenizer.chat_template`, yet its instruction-tuned weights expect the family's
turn format; without it every chat reply would be a continuation of "User: ..." lines. These
are written from each family's documented format, and used only when the file has none.
"""

from __future__ import annotations

# Gemma's turns: `<start_of_turn>user` / `<start_of_turn>model`, each closed by
# `<end_of_turn>`; no system role, so a system message opens the first user turn.
GEMMA_TURNS = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + ns.system + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% set ns.system = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# general.architecture -> the template its files use when they carry none.
BUILTIN_TEMPLATES: dict[str, str] = {"gemma3": GEMMA_TURNS, "gemma2": GEMMA_TURNS, "gemma": GEMMA_TURNS}
