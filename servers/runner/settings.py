"""ModelSettings: the [model] section of the instance config, as each runner process
receives it (servers/settings.py), with `threads` resolved by the supervisor. The one place
its keys, defaults and checks live; also the default layout of runners x threads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmos.servers.settings import ConfigError

# A model file at least this big is "large": its matrices are big enough that one runner
# using every core beats one runner per core (below).
LARGE_MODEL_BYTES = 64 << 20


@dataclass(slots=True, frozen=True)
class ModelSettings:
    """[model]: the model every runner serves, and how the runners compute it."""

    path: str = ""  # a GGUF or llama2.c file; "": the built-in stories260K
    # 0 for both: chosen for the machine and the model. A large model (a file of 64 MiB or
    # more) gets one runner with a thread per core: one stream then uses every core (Gemma 3
    # 270M on 2 cores decodes 88 tokens/s alone against ~45 with a core per runner, and batches
    # as fast), and the packed weights are held once, not once per runner. A small one gets a
    # runner per core with one thread: its matrices are too small to split (the built-in model:
    # 11.4k tokens/s with 2 runners against 7.1k with 1 runner x 2 threads). One of the two
    # given: the other fills the cores. `llmos tune` measures the choices on this machine.
    runners: int = 0  # runner processes
    threads: int = 0  # threads per runner step (any count computes the same bits); 0: as for runners
    context: int = 0  # positions a sequence may hold; 0: the model file's context length
    # What KV pages hold: "f32", or "f16": half the bytes per token, so twice the tokens in the
    # same pages, each K and V element rounded to a half once (logits move by ~1e-3; Gemma 3
    # 270M decodes at B=32 about as fast).
    kv_dtype: str = "f32"

    def __post_init__(self) -> None:
        if not 0 <= self.runners <= 64 or not 0 <= self.threads <= 64 or self.context < 0:
            raise ConfigError("model: runners and threads in 0..64 (0: chosen for the machine), context >= 0")
        if self.kv_dtype not in ("f32", "f16"):
            raise ConfigError(f"model.kv_dtype must be \"f32\" or \"f16\", got {self.kv_dtype!r}")
        if self.context == 1:
            raise ConfigError("model.context must be at least 2 (a prompt and a token), or 0 for the file's")

    def model_path(self) -> Path:
        from llmos.servers.runner.loaders import (
            default_model_path,  # numpy and gguf: only when asked
        )

        return Path(self.path) if self.path else default_model_path()

    def is_large(self) -> bool:
        try:
            return self.model_path().stat().st_size >= LARGE_MODEL_BYTES
        except OSError:
            return False  # a missing file is refused before anything starts

    def layout(self, cores: int | None = None) -> tuple[int, int]:
        """(runners, threads per runner) for this machine's cores."""
        cores = max(1, cores or os.cpu_count() or 1)
        if self.runners and self.threads:
            return self.runners, self.threads
        if self.threads:
            return max(1, cores // self.threads), self.threads
        if self.runners:
            return self.runners, max(1, cores // self.runners)
        return (1, cores) if self.is_large() else (cores, 1)

    @property
    def kv_bytes(self) -> int:
        """Bytes of one K or V element in the pages."""
        return 2 if self.kv_dtype == "f16" else 4
