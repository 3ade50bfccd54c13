"""llmos: an operating system for serving language models.

The installed package maps the repository's folders (pyproject.toml): `llmos.microkernel`
(the kernel and its rings), `llmos.servers` (memory, scheduler, runner, gateway),
`llmos.libllm` (the client library: `from llmos import libllm`), and this folder, tools/, as
`llmos` itself: the CLI (`llmos`, `python -m llmos`), the supervisor, the benchmarks.
"""
