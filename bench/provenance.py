"""What produced a result: bench (and its git commit in a checkout), Python, the libraries, the platform."""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["versions"]


@cache
def versions() -> dict[str, str]:
    """Versions recorded in every fold's ``config.yaml`` and in the report (computed once per process)."""
    import numpy as np
    import pandas as pd
    import sklearn
    import torch

    try:
        bench_version = version("bench")
    except PackageNotFoundError:
        bench_version = "unknown"
    repo = Path(__file__).resolve().parents[1]
    commit = ""
    if (repo / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return {
        "bench": bench_version + (f" (git {commit})" if commit else ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }
