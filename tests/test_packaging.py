"""What `pip install` puts in site-packages: one name, `llmos`, and nothing generic (`tools`,
`servers`) that another project's package would overwrite or be overwritten by."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_every_package_of_the_repository_is_installed_under_llmos() -> None:
    folders = {name: Path(folder) for name, folder in SETUPTOOLS["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join((name, *rel.parts)))
    assert found == set(SETUPTOOLS["packages"])  # a new subpackage must be listed to be installed
    assert all(name == "llmos" or name.startswith("llmos.") for name in SETUPTOOLS["packages"])


def test_only_llmos_is_importable_outside_the_checkout(tmp_path: Path) -> None:
    for generic in ("tools", "servers", "microkernel", "libllm"):
        assert run(f"import {generic}", tmp_path).returncode != 0, f"{generic} is installed as a top-level name"
    ok = run("import llmos.servers.scheduler, llmos.microkernel._ring; from llmos import libllm; print(libllm.connect)",
             tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_python_dash_m_llmos_is_the_command(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "llmos", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "usage: llmos" in out.stdout, out.stderr
