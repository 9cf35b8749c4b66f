"""Test helper shared by the server-process tests: wait for a line in a child's stderr."""

from __future__ import annotations

import subprocess
import time


def read_until(process: subprocess.Popen, marker: str, lines: list[str],
               timeout_s: float) -> str:
    """Read the child's stderr line by line (collected in lines) until one contains marker."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return line
    raise AssertionError(f"{marker!r} never logged:\n{''.join(lines)}")
