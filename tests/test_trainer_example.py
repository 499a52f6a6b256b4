"""examples/accelerate_loop.py runs and trains with the optimizer it was asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_accelerate_loop_example(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "accelerate_loop.py"), "--optim", "sgdp", "--steps", "5"]
    cmd += ["--optim_args", "momentum=0.9,nesterov=true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step   5  loss" in out.stdout and "trained with SGDP" in out.stdout
