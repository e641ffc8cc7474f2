"""Run the CLI with this package's command modules registered, in a subprocess with its own home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Importing membercare.cli.segments registers its groups even before the lead wires it into _register().
_ENTRY = "import sys, membercare.cli as c, membercare.cli.segments; c.main(sys.argv[1:])"


def run_cli(*args: str, home: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MEMBERCARE_")}
    # Wide terminal: Rich hard-wraps stderr at the terminal width, which would split a long one-line error.
    e.update({"MEMBERCARE_HOME": str(home), "COLUMNS": "1000"}, **(env or {}))
    return subprocess.run([sys.executable, "-c", _ENTRY, *args], capture_output=True, text=True, env=e, cwd=ROOT,
                          timeout=120)
