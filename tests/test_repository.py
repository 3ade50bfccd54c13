"""The repository stands alone: a clone has every file its code, docs and comments name."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = ("../shared", "DESIGN.md", "STYLE.md")  # where a design and models lived before the repository had them


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"], capture_output=True, text=True,
                               check=True, timeout=60).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    suffixes = {".py", ".pyx", ".pxd", ".pyi", ".md", ".toml", ".sh", ".h", ".c", ".txt", ".cfg", ""}
    return [REPO / n for n in names if Path(n).suffix in suffixes and (REPO / n).is_file()]


def test_nothing_refers_to_files_outside_the_repository() -> None:
    found = []
    for path in tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        found += [f"{path.relative_to(REPO)}: {word}" for word in OUTSIDE if word in text]
    assert found == []


def test_the_docs_link_to_files_that_exist() -> None:
    broken = []
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert broken == []
