"""`python -m llmos`: the `llmos` command."""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    sys.exit(main())
