"""Real multi-process runs for the sharding tests: spawned ranks on gloo, with a free port and a timeout."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, out_dir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # DeepSpeed's CPU shared-memory comm op can abort in interpreter teardown ("terminate called without an
    # active exception") after all work is done: wait for every rank, then leave without that teardown
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world: int, tmp_path: Path, *args: Any, timeout: float = 240) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes; return each rank's result.

    A rank that hangs (a collective some rank never joined) fails the test after ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, str(tmp_path), args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [(tmp_path / f"rank{r}.err") for r in range(world)]
    msgs = [e.read_text() for e in errors if e.exists()]
    if msgs:
        raise AssertionError("a rank failed:\n" + msgs[0])
    if hung:
        raise AssertionError(f"ranks {hung} did not finish within {timeout} s (deadlock?)")
    bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks {bad} exited with {[procs[r].exitcode for r in bad]}")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


# Test-only: accelerate picks no backend for several ranks on a machine without an accelerator, so every rank
# would think it is alone (and cpu=True would turn DeepSpeed off). This launcher makes it choose gloo / MULTI_CPU,
# then runs the script given as its first argument unchanged. Real GPU launches need nothing like it.
GLOO_LAUNCHER = """
import os, runpy, sys
from accelerate.state import PartialState
from accelerate.utils import DistributedType

original = PartialState._prepare_backend

def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "gloo", DistributedType.MULTI_CPU
    return original(self, cpu, sagemaker_dp, backend)

PartialState._prepare_backend = prepare_backend
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
# DeepSpeed's CPU shared-memory comm op can abort in interpreter teardown after all work is done (exit -6):
# wait for every rank, then leave without that teardown
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""
