"""Log-probabilities in OpenAI's two shapes: the completions API's (tokens, token_logprobs,
top_logprobs, text_offset) and chat's (content: token, logprob, bytes, top_logprobs). The
figures are the runner's (libllm's `Completion.logprobs`); this only names the tokens.
Runs in the gateway process."""

from __future__ import annotations

from typing import Any

from llmos.libllm.protocol import Logprob
from llmos.libllm.tokenizer import Tokenizer


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[Logprob], *,
                        offset: int = 0, leading: list[Logprob | None] | None = None,
                        leading_ids: list[int] | None = None) -> dict[str, Any]:
    """The completions shape; `leading` (echo) are the prompt's own, None for its first token."""
    ids = [*(leading_ids or []), *token_ids]
    values: list[Logprob | None] = [*(leading or []), *logprobs]
    texts = [_text(tokenizer, t) for t in ids]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts,
            "token_logprobs": [None if v is None else v.logprob for v in values],
            "top_logprobs": [None if v is None else {_text(tokenizer, t): lp for t, lp in
                                                     zip(v.top_ids, v.top_logprobs, strict=True)} for v in values],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[Logprob]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = tokenizer.piece_bytes(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(t, v.logprob), "top_logprobs": [entry(i, lp) for i, lp in
                                                                 zip(v.top_ids, v.top_logprobs, strict=True)]}
                        for t, v in zip(token_ids, logprobs, strict=True)]}


def _text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.piece_bytes(token).decode("utf-8", "replace")
