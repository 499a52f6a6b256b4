"""The self-check users run under their own launcher: PASS where we are exact, FAIL on the reference."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONPATH=str(ROOT)
    )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_single_process_passes():
    done = run([sys.executable, "-m", "hf_adamp.selfcheck", "--steps", "4"])
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "decisions at the last step: channel, layer, none" in done.stdout and "PASS" in done.stdout


def test_ddp_on_two_cpu_ranks_passes():
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "hf_adamp.selfcheck",
        "--steps",
        "4",
    ]
    done = run(cmd)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "MULTI_CPU on 2 process(es)" in done.stdout and "PASS" in done.stdout


@pytest.mark.parametrize("stage, optimizer", [(2, "adamp"), (3, "sgdp")])
def test_deepspeed_zero_passes(stage, optimizer):
    pytest.importorskip("deepspeed")
    cmd = ACCELERATE + [
        "--use_deepspeed",
        "--zero_stage",
        str(stage),
        "--num_processes",
        "1",
        "-m",
        "hf_adamp.selfcheck",
        "--optimizer",
        optimizer,
        "--steps",
        "4",
    ]
    done = run(cmd)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "DEEPSPEED on 1 process(es)" in done.stdout and "sharding layouts: 1" in done.stdout
    assert "PASS" in done.stdout


def test_reference_adamp_fails_under_zero2():
    """The check can fail: the reference package skips the projection on ZeRO's flat partitions."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("adamp")
    cmd = ACCELERATE + [
        "--use_deepspeed",
        "--zero_stage",
        "2",
        "--num_processes",
        "1",
        "-m",
        "hf_adamp.selfcheck",
        "--optimizer",
        "reference",
        "--steps",
        "4",
    ]
    done = run(cmd)
    assert done.returncode != 0
    assert "FAIL" in done.stdout
