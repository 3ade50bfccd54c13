"""Build the Cython extensions; all metadata lives in pyproject.toml.

Every ``*.pyx`` under the packages becomes an extension of the same dotted name.
``MK_DEBUG=1`` builds with annotated HTML and line tracing for profiling.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = Path(__file__).parent
PACKAGES = ("microkernel", "servers", "libllm", "tools")
DEBUG = os.environ.get("MK_DEBUG") == "1"


def find_extensions() -> list[Extension]:
    extensions = []
    for package in PACKAGES:
        for pyx in sorted((ROOT / package).rglob("*.pyx")):
            rel = pyx.relative_to(ROOT)
            name = ".".join(rel.with_suffix("").parts)
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


setup(
    ext_modules=cythonize(
        find_extensions(),
        compiler_directives={"language_level": "3", "linetrace": DEBUG},
        annotate=DEBUG,
    ),
)
