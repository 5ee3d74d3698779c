"""Static checks as part of the suite: ruff over the code, mypy over the package (configs in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=1200)


def test_ruff_is_clean() -> None:
    result = run("ruff", "check", "inferflux", "inferctl", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_mypy_finds_no_type_errors() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "Success" in result.stdout
