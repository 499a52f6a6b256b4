"""The code passes ruff: the lint rules in pyproject.toml, and ruff's formatting. ruff is a test dependency
(the ``test`` extra), so a missing ruff fails here rather than skipping the check."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ["hf_adamp", "tests", "benchmarks", "examples", "results"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_clean(command):
    out = subprocess.run([sys.executable, "-m", "ruff", *command, *CODE], cwd=ROOT, capture_output=True, text=True)
    assert "No module named ruff" not in out.stderr, "ruff is missing: pip install -e '.[test]'"
    assert out.returncode == 0, out.stdout + out.stderr
