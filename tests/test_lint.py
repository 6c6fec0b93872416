"""The code base is clean under ruff, as configured in pyproject.toml ([tool.ruff]); ruff is in the
`test` extra, so this runs wherever the tests are installed to run."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "gpt2ipu", "tests", "workflow/scripts", "tools"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
