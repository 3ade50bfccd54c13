"""No server imports another server (DESIGN.md): they share only microkernel, libllm's
pure modules and the server loop in servers/base.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVERS = Path(__file__).parents[2] / "servers"
PACKAGES = sorted(p.name for p in SERVERS.iterdir() if p.is_dir() and (p / "__init__.py").exists())


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
                if parts[0] == "servers" and len(parts) > 1:
                    assert parts[1] in (package, "base"), f"{path.relative_to(SERVERS)} imports {name}"


def test_every_server_package_is_checked() -> None:
    assert {"memory", "runner", "scheduler", "echo"} <= set(PACKAGES)
