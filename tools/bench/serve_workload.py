"""The workload of `llmos bench serve`: a list of requests drawn from a seed.

Runs in the benchmark's process. Everything is a pure function of the seed and the
options, so every policy and both baselines get exactly the same requests: prompts are
text (built from a fixed stock of story sentences, valid for `session.submit`) with their
token ids as libllm will encode them, output lengths (max_tokens), priority classes, a
per-request sampling seed, and, for open-loop runs, arrival times.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# A fixed stock of sentences in the style of TinyStories (what stories260K was trained on).
SENTENCES = (
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park with her friends.",
    "One day, she saw a big red ball under a tree.",
    "Tom was a happy dog who liked to run and jump.",
    "The sun was shining and the birds were singing.",
    "He wanted to find a new toy to share with his sister.",
    "Mom said they could go to the beach after lunch.",
    "The little bird was sad because it could not fly.",
    "They worked together and built a tall tower of blocks.",
    "Ben found a shiny rock near the river and smiled.",
    "The cat jumped on the table and knocked over the milk.",
    "Sue learned that it is good to be kind to others.",
    "A small frog lived in a pond next to a big house.",
    "Every morning, the old man gave bread to the ducks.",
    "The children laughed and danced in the warm rain.",
    "Max was scared of the dark, but his friend helped him.",
    "They ate cake and played games until it was time for bed.",
    "The bunny hopped into the garden to look for carrots.",
    "Anna wanted to paint a picture of her family.",
    "The boat sailed across the lake under the blue sky.",
    "Dad showed them how to plant seeds in the soft dirt.",
    "The bear was hungry, so he looked for honey in the woods.",
    "At the end of the day, they were tired but very happy.",
    "The moral of the story is to always say thank you.",
)


class WorkloadError(ValueError):
    """An option that does not describe a workload (the message says which and why)."""


@dataclass(slots=True, frozen=True)
class Dist:
    """A distribution of lengths in tokens: "fixed:N", "uniform:LO:HI" (inclusive),
    "lognormal:MEAN:SIGMA" (MEAN tokens on average; SIGMA of the underlying normal)."""

    kind: str
    a: float
    b: float = 0.0

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.a:g}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            values = np.full(n, self.a)
        elif self.kind == "uniform":
            values = rng.integers(int(self.a), int(self.b) + 1, size=n).astype(np.float64)
        else:
            mu = math.log(self.a) - self.b**2 / 2  # so that the mean is self.a
            values = rng.lognormal(mu, self.b, size=n)
        lengths: np.ndarray = np.maximum(np.rint(values), 1).astype(np.int64)
        return lengths


def parse_dist(text: str) -> Dist:
    parts = text.split(":")
    try:
        numbers = [float(p) for p in parts[1:]]
    except ValueError:
        raise WorkloadError(f"{text!r}: the numbers of a distribution must be numbers") from None
    kind = parts[0]
    if kind == "fixed" and len(numbers) == 1 and numbers[0] >= 1:
        return Dist(kind, numbers[0])
    if kind == "uniform" and len(numbers) == 2 and 1 <= numbers[0] <= numbers[1]:
        return Dist(kind, numbers[0], numbers[1])
    if kind == "lognormal" and len(numbers) == 2 and numbers[0] >= 1 and numbers[1] >= 0:
        return Dist(kind, numbers[0], numbers[1])
    raise WorkloadError(f"{text!r} is not a length distribution: use fixed:N, uniform:LO:HI (1 <= LO <= HI) "
                        "or lognormal:MEAN:SIGMA (MEAN >= 1, SIGMA >= 0)")


def parse_priorities(text: str) -> dict[int, float]:
    """ "0:0.8,2:0.2" -> {0: 0.8, 2: 0.2} (weights normalised to sum 1)."""
    classes: dict[int, float] = {}
    try:
        for part in text.split(","):
            name, _, weight = part.partition(":")
            classes[int(name)] = float(weight or 1.0)
    except ValueError:
        raise WorkloadError(f"{text!r}: priorities are CLASS:WEIGHT pairs, e.g. 0:0.8,2:0.2") from None
    total = sum(classes.values())
    if not classes or any(w < 0 or not math.isfinite(w) for w in classes.values()) or not total > 0:
        raise WorkloadError(f"{text!r}: class weights must be finite, >= 0 and not all 0")
    return {p: w / total for p, w in sorted(classes.items())}


@dataclass(slots=True, frozen=True)
class Spec:
    """Everything a workload is drawn from."""

    num_requests: int
    seed: int = 0
    prompt_len: Dist = Dist("uniform", 16, 128)
    output_len: Dist = Dist("uniform", 32, 256)
    priorities: dict[int, float] | None = None  # None: one class, 0
    shared_prefix: float = 0.0  # share of requests that start with one of the common prefixes
    num_prefixes: int = 4
    prefix_len: int = 64  # tokens of each common prefix (BOS included)
    temperature: float = 0.8
    rate: float = 0.0  # open loop: Poisson arrivals per second; 0: closed loop (no arrival times)
    context: int = 512  # the model's context length: prompt + output always fits

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise WorkloadError("the workload needs at least one request")
        if not 0.0 <= self.shared_prefix <= 1.0:
            raise WorkloadError(f"--shared-prefix must be in [0, 1], got {self.shared_prefix}")
        if self.num_prefixes < 1 or not 2 <= self.prefix_len <= self.context // 2:
            raise WorkloadError(f"prefixes: at least one, of 2..{self.context // 2} tokens")
        if self.rate < 0 or not math.isfinite(self.rate):
            raise WorkloadError(f"--rate must be >= 0, got {self.rate}")
        if not 0.0 <= self.temperature <= 2.0:
            raise WorkloadError(f"--temperature must be in [0, 2], got {self.temperature}")


@dataclass(slots=True, frozen=True)
class WorkItem:
    """One request. `prompt_ids` are what libllm's tokenizer makes of `prompt` (BOS first)."""

    index: int
    prompt: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    priority: int
    seed: int
    temperature: float
    prefix: int  # which common prefix it starts with; -1: none
    arrival_s: float  # open loop: when it is due, from the start of the run; 0 in a closed loop

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


Encoder = Callable[[str], list[int]]


def fit_text(encode: Encoder, head: str, words: Sequence[str], target: int) -> tuple[str, list[int]]:
    """`head` followed by as many of `words` as fit in `target` tokens (at least one word
    when `head` is empty). Returns the text and its ids."""
    def text_of(k: int) -> str:
        tail = " ".join(words[:k])
        return f"{head} {tail}" if head and tail else head or tail

    lo, hi = (0 if head else 1), len(words)  # the answer is in [lo, hi]: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(text_of(mid))) <= target:
            lo = mid
        else:
            hi = mid - 1
    text = text_of(lo)
    return text, encode(text)


def _words(rng: np.random.Generator, target: int) -> list[str]:
    """Sentences from the stock in a random order, as words, comfortably over `target` tokens."""
    words: list[str] = []
    while len(words) < target + 8:  # every word is at least one token
        words += SENTENCES[int(rng.integers(len(SENTENCES)))].split()
    return words


def make_workload(spec: Spec, encode: Encoder) -> list[WorkItem]:
    """The requests `spec` describes; `encode` is the model's tokenizer (with BOS), so
    prompt lengths are exact token counts. The same spec always gives the same list."""
    n = spec.num_requests
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(7)]
    lengths, outputs, classes, shared, texts, seeds, arrivals = streams
    prompt_lens = np.clip(spec.prompt_len.draw(lengths, n), 2, spec.context - 2)
    output_lens = spec.output_len.draw(outputs, n)
    priorities = spec.priorities or {0: 1.0}
    names = list(priorities)
    chosen = classes.choice(len(names), size=n, p=[priorities[p] for p in names])
    prefixed = shared.random(n) < spec.shared_prefix
    which_prefix = shared.integers(spec.num_prefixes, size=n)
    prefixes = [fit_text(encode, "", _words(texts, spec.prefix_len), spec.prefix_len)[0]
                for _ in range(spec.num_prefixes)]
    request_seeds = seeds.integers(0, 2**31, size=n)
    gaps = arrivals.exponential(1.0 / spec.rate, size=n) if spec.rate else np.zeros(n)
    due = np.cumsum(gaps) - gaps[0]  # the first request is due at once
    items = []
    for i in range(n):
        head = prefixes[int(which_prefix[i])] if prefixed[i] else ""
        target = int(prompt_lens[i])
        if head:
            target = min(max(target, spec.prefix_len + 8), spec.context - 2)
        text, ids = fit_text(encode, head, _words(texts, target), target)
        max_tokens = int(min(output_lens[i], spec.context - len(ids)))
        items.append(WorkItem(i, text, tuple(ids), max_tokens, names[int(chosen[i])], int(request_seeds[i]),
                              spec.temperature, int(which_prefix[i]) if prefixed[i] else -1, float(due[i])))
    return items


def describe(items: Sequence[WorkItem]) -> dict[str, object]:
    """Totals of a workload, for the report."""
    by_class: dict[str, int] = {}
    for item in items:
        by_class[str(item.priority)] = by_class.get(str(item.priority), 0) + 1
    return {
        "requests": len(items),
        "prompt_tokens": sum(i.prompt_tokens for i in items),
        "max_output_tokens": sum(i.max_tokens for i in items),
        "shared_prefix_requests": sum(1 for i in items if i.prefix >= 0),
        "requests_by_priority": by_class,
        "last_arrival_s": max(i.arrival_s for i in items),
    }


def digest(token_ids: Sequence[int]) -> int:
    """A checksum of a request's output, to compare runs without keeping the tokens."""
    return zlib.crc32(np.asarray(token_ids, dtype=np.int32).tobytes())
