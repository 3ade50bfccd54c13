"""A request's settings as the caller gives them, and their checks: every argument of
`Session.submit` (and of generate, stream, submit_n, libllm.aio) is checked here, before
anything is tokenised or sent, and a bad one raises InvalidRequest naming the parameter,
the type or range it must have, and what it got. Nothing else escapes: no OverflowError
from a huge int, no TypeError from a string where a number goes.

Pure (no I/O). The ranges: the integers fit the scheduler's 32-bit fields (seed: 64 bits; priority: the
scheduler's range);
the floats are finite; the sampling ranges are SamplingParams' (libllm.sampling).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from llmos.libllm import protocol as P
from llmos.libllm.sampling import SamplingParams
from llmos.microkernel.errors import InvalidRequest

if TYPE_CHECKING:
    from llmos.libllm.tokenizer import Tokenizer

INT32_MAX = 2**31 - 1
MAX_TENANT_CHARS = 256
MAX_TIMEOUT_S = 1e9  # about 30 years: anything finite a caller means; None is no timeout


@dataclass(slots=True, frozen=True)
class Options:
    """A request's settings, as `Session.submit` takes them (defaults included)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    priority: int = 0
    timeout: float | None = None  # seconds; when it passes, DeadlineExceeded (the request ends)
    tenant: str = ""
    logprobs: int | None = None  # 0..20: each token's Logprob with that many top tokens
    prompt_logprobs: bool = False  # the prompt tokens' Logprobs too (after the first)
    presence_penalty: float = 0.0  # libllm.sampling.SamplingParams defines the three
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


class RequestArgs(TypedDict, total=False):
    """The keyword arguments every request takes (`Session.generate`, `submit`, `stream`,
    `submit_n`, `generate_n`, `chat`, and libllm.aio's): `Options`' fields, whose comments
    say what each does (tests/libllm/test_options.py keeps the two the same)."""

    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: list[str] | None
    priority: int
    timeout: float | None
    tenant: str
    logprobs: int | None
    prompt_logprobs: bool
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float


OPTION_NAMES = frozenset(f.name for f in fields(Options))


def options_of(args: Mapping[str, Any]) -> Options:
    """The Options a request's keyword arguments make; an unknown one is an InvalidRequest
    naming it (not Python's TypeError)."""
    unknown = sorted(set(args) - OPTION_NAMES)
    if unknown:
        raise InvalidRequest(f"unknown argument(s) {', '.join(unknown)}; a request takes {', '.join(sorted(OPTION_NAMES))}")
    return Options(**args)


def seeds_of(n: int, seed: int | None) -> list[int | None]:
    """The seeds of n completions of one prompt: seed, seed+1, ... (a random start when None).

    Raises:
        InvalidRequest: n is not a positive int, or seed + n - 1 passes 2**64.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidRequest(f"n must be a positive int, got {n!r}")
    if seed is None:
        seed = secrets.randbits(62)
    elif not isinstance(seed, int) or isinstance(seed, bool):
        return [seed] * n  # not a seed: the first request's checks name it
    elif seed + n > 2**64:
        raise InvalidRequest(f"seed + n - 1 must stay below 2**64 (the n seeds are seed, seed+1, ...), got "
                             f"seed {seed!r}")
    return [seed + i for i in range(n)]


def check_options(o: Options) -> None:
    """Raises InvalidRequest for the first bad setting (its message names it)."""
    whole("max_tokens", o.max_tokens, 1, INT32_MAX)
    number("temperature", o.temperature, 0.0, 100.0)
    whole("top_k", o.top_k, 0, INT32_MAX)
    number("top_p", o.top_p, 0.0, 1.0, low_open=True)
    if o.seed is not None and (isinstance(o.seed, bool) or not isinstance(o.seed, int) or not 0 <= o.seed < 2**64):
        raise InvalidRequest(f"seed must be None or an int in [0, 2**64), got {_shown(o.seed)}")
    if o.stop is not None:
        if not isinstance(o.stop, list) or not all(isinstance(s, str) and s for s in o.stop):
            raise InvalidRequest(f"stop must be None or a list of non-empty strings, got {_shown(o.stop)}")
        for i, s in enumerate(o.stop):
            text(f"stop[{i}]", s)
    whole("priority", o.priority, -P.MAX_PRIORITY, P.MAX_PRIORITY)
    if o.timeout is not None:
        number("timeout", o.timeout, 0.0, MAX_TIMEOUT_S, low_open=True)
    if not isinstance(o.tenant, str) or len(o.tenant) > MAX_TENANT_CHARS:
        raise InvalidRequest(f"tenant must be a str of at most {MAX_TENANT_CHARS} characters, got {_shown(o.tenant)}")
    text("tenant", o.tenant)
    if o.logprobs is not None:
        whole("logprobs", o.logprobs, 0, P.MAX_LOGPROBS, none_ok=True)
    if not isinstance(o.prompt_logprobs, bool):
        raise InvalidRequest(f"prompt_logprobs must be a bool, got {_shown(o.prompt_logprobs)}")
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        number(name, getattr(o, name), -math.inf, math.inf)
    try:  # the ranges are SamplingParams'
        SamplingParams(presence_penalty=float(o.presence_penalty), frequency_penalty=float(o.frequency_penalty),
                       repetition_penalty=float(o.repetition_penalty))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def whole(name: str, value: Any, low: int, high: int, *, none_ok: bool = False) -> None:
    """An int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        kind = "None or an int" if none_ok else "an int"
        raise InvalidRequest(f"{name} must be {kind} in [{low}, {high}], got {_shown(value)}")


def number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    """A finite int or float (not a bool) in [low, high] (or (low, high])."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            as_float = float(value)
        except OverflowError:  # an int past float's range
            ok = False
        else:
            ok = math.isfinite(as_float) and (low < as_float if low_open else low <= as_float) and as_float <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{_bound(low)}, {_bound(high)}]"
        where = f" in {bounds}" if math.isfinite(low) or math.isfinite(high) else ""
        raise InvalidRequest(f"{name} must be a finite number{where}, got {_shown(value)}")


def text(name: str, value: str) -> None:
    """A str that is valid Unicode (a lone surrogate is no text a model could read)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{name} is not valid Unicode text ({exc.reason} at {exc.start})") from None


def _bound(x: float) -> str:
    return "inf" if x == math.inf else f"{x:g}"


def _shown(value: Any) -> str:
    """The value for a message: its repr, cut short (a huge int or list stays readable)."""
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({type(value).__name__})"


def submit_of(o: Options, prompt_ids: list[int], seed: int, stream: bool) -> P.Submit:
    """The SCHED_SUBMIT these (checked) options make. The scheduler believes `tenant` only
    from the gateway (for fair share and quotas)."""
    return P.Submit(prompt_ids, o.max_tokens, float(o.temperature), o.top_k, float(o.top_p), seed, o.priority,
                    stream, o.timeout, o.tenant, -1 if o.logprobs is None else o.logprobs, o.prompt_logprobs,
                    presence_penalty=float(o.presence_penalty), frequency_penalty=float(o.frequency_penalty),
                    repetition_penalty=float(o.repetition_penalty))


def prompt_ids_of(tokenizer: Tokenizer, info: P.ModelInfo, prompt: str | Sequence[int]) -> list[int]:
    """The prompt as token ids, checked (text is encoded with the model's tokenizer; ids are
    copied as plain ints, so what a failover resubmits stays as it was asked)."""
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (str, Sequence, np.ndarray)):
        raise InvalidRequest(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    if isinstance(prompt, str):
        text("prompt", prompt)
        ids = tokenizer.encode(prompt)
    else:
        if len(prompt) == 0:
            raise InvalidRequest("prompt must hold at least one token id")
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < info.vocab_size:
                raise InvalidRequest(f"prompt[{i}] must be a token id, an int in [0, {info.vocab_size}), got {t!r}")
        ids = [int(t) for t in prompt]
    if len(ids) >= info.context_length:
        raise InvalidRequest(f"prompt of {len(ids)} tokens does not fit the context of {info.context_length} tokens")
    return ids
