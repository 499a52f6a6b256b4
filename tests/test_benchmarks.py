"""The benchmarks run end to end at a small size (no timing is checked).

The ZeRO-Offload one against torch's fused AdamW rather than DeepSpeedCPUAdam: that op's first build takes about
3 minutes here, which a smoke test on a fresh CI machine should not pay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "zero_offload_step.py"


def _env() -> dict[str, str]:
    root = str(BENCHMARKS.parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


def test_step_time_prints_its_tables() -> None:
    cmd = [sys.executable, str(BENCHMARKS / "step_time.py"), "--model", "small", "--rounds", "1", "--twins"]
    cmd += ["--only", "adamw(fused),sgd(fused),hf_adamp.adamp,hf_adamp.sgdp", "--skip", "plain", "--flush-mb", "8"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "paired ratios" in done.stdout and "hf_adamp.SGDP(delta=0)" in done.stdout
    assert "torch.SGD(fused)#2" in done.stdout


def test_kernel_modes_prints_its_table() -> None:
    from hf_adamp import kernels

    if not kernels.available():
        pytest.skip("the fused kernels are unavailable here")
    cmd = [sys.executable, str(BENCHMARKS / "kernel_modes.py"), "--shape", "64x96", "--rounds", "2"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "AdamP spec_channel" in done.stdout and "torch SGD(fused)" in done.stdout
    assert "SGDP repair" in done.stdout and "AdamP apply" in done.stdout


def _run_gpu_check(env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--rounds", "1", "--steps", "1"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_gpu_check_without_cuda_says_so() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check would run for real")
    env = {k: v for k, v in _env().items() if k != "GPU_CHECK_ON_CPU"}
    done = _run_gpu_check(env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no CUDA device here" in done.stdout


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_under_the_interpreter() -> None:
    """GPU_CHECK_ON_CPU=1: a few of the cuda tests and the timing table, on CPU through Triton's interpreter."""
    pytest.importorskip("triton")
    done = _run_gpu_check(dict(_env(), GPU_CHECK_ON_CPU="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "PASS  checks (tests/test_cuda.py, -m cuda): 2 passed" in out and "all checks passed" in out
    assert "hf_adamp.AdamP(eager)" in out and "torch.SGD(fused)" in out


@pytest.mark.distributed
@pytest.mark.slow
def test_zero_offload_benchmark_prints_its_table() -> None:
    pytest.importorskip("deepspeed")
    env = _env()
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
