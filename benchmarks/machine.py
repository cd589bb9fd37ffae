"""What every benchmark records about where it ran: CPU, cores, load, Python, git commit.

Benchmarks are scripts (``python benchmarks/NAME.py``), so this sits beside them and is imported by
file-relative path; each adds the library versions that matter to its own numbers.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    """Output of a git command in the repository ("" if git is unavailable)."""
    try:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return res.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load at start, Python, commit, and whether the measured code had changes."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD") or "unknown",
        # The measured code may differ from the commit: say so rather than let the number mislead.
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "ros2_ws/src")),
    }
