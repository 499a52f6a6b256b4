"""The ZeRO-Offload benchmark runs end to end at a small size (no timing is checked).

Against torch's fused AdamW rather than DeepSpeedCPUAdam: that op's first build takes about 3 minutes here,
which a smoke test on a fresh CI machine should not pay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "zero_offload_step.py"


def test_zero_offload_benchmark_prints_its_table() -> None:
    root = str(SCRIPT.parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, str(SCRIPT), "--model", "small", "--steps", "1", "--warmup", "1", "--sets", "adam"]
    cmd += ["--only", "hf_adamp.adamp,torch.adamw", "--timeout", "500"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "build/load (rank 0" in out and "engine.step ms" in out
    for name in ("hf_adamp.AdamP ", "hf_adamp.AdamP(eager)", "torch.AdamW(fused)"):
        assert name in out
    assert "exactness: hf_adamp.AdamP on the ZeRO-2 partitions" in out and "NEVER PROJECTED" not in out
    assert "hf_adamp.AdamP / torch.AdamW(fused):" in out
