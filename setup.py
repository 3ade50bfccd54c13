"""Build the Cython extensions; all metadata lives in pyproject.toml.

Every ``*.pyx`` under the packages becomes an extension of its dotted name under ``llmos``.
``MK_DEBUG=1`` builds with annotated HTML and line tracing for profiling.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = Path(__file__).parent
# Folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"microkernel": "llmos.microkernel", "servers": "llmos.servers", "libllm": "llmos.libllm", "tools": "llmos"}
DEBUG = os.environ.get("MK_DEBUG") == "1"


def find_extensions() -> list[Extension]:
    extensions = []
    for package in PACKAGES:
        for pyx in sorted((ROOT / package).rglob("*.pyx")):
            rel = pyx.relative_to(ROOT)
            name = ".".join(rel.with_suffix("").parts)  # as Cython finds its .pxd beside it
            extensions.append(
                Extension(
                    name,
                    [str(rel)],
                    include_dirs=["microkernel/include", "servers/runner/include", numpy.get_include()],
                    extra_compile_args=["-O3", "-ffp-contract=off", "-Wall", "-Wno-unused-function", "-Wno-array-bounds", "-pthread"],
                    extra_link_args=["-pthread"],
                    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
                    + ([("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []),
                )
            )
    return extensions


def installed_as(extension: Extension) -> Extension:
    """The extension under its installed name (microkernel._ring -> llmos.microkernel._ring).
    Cython compiles it under the folder's name, so that it finds the .pxd beside the .pyx; a
    module's init function is named by its last part only, so it imports under either."""
    package, _, rest = extension.name.partition(".")
    extension.name = f"{PACKAGES[package]}.{rest}"
    return extension


setup(
    ext_modules=[
        installed_as(extension)
        for extension in cythonize(
            find_extensions(),
            compiler_directives={"language_level": "3", "linetrace": DEBUG},
            annotate=DEBUG,
        )
    ],
)
