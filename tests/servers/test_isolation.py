"""No server imports another server (docs/design.md): they share only microkernel, libllm's
pure modules and the modules at the top of servers/ that every server may use (the server
loop in base.py, the start-up progress lines in start_progress.py, the settings' encoding in
settings.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVERS = Path(__file__).parents[2] / "servers"
PACKAGES = sorted(p.name for p in SERVERS.iterdir() if p.is_dir() and (p / "__init__.py").exists())
SHARED = sorted(p.stem for p in SERVERS.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("package", PACKAGES)
def test_a_server_imports_no_other_server(package: str) -> None:
    for path in (SERVERS / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[:2] == ["llmos", "servers"] and len(parts) > 2:
                    assert parts[2] in (package, *SHARED), f"{path.relative_to(SERVERS)} imports {name}"


def test_every_server_package_is_checked() -> None:
    assert {"memory", "runner", "scheduler", "echo"} <= set(PACKAGES)
    assert SHARED == ["base", "settings", "start_progress"]  # a module added here is shared by every server: say so above
