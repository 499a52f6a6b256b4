"""Building, caching and loading the fused CPU kernels (hf_adamp.kernels), in fresh processes.

Every test has its own empty cache (TORCH_EXTENSIONS_DIR under tmp_path). Processes are real: package copies in
temporary directories, concurrent first uses, a builder killed while it holds the build lock, two gloo ranks of
which one has no compiler. No test depends on how long a build takes; timeouts only catch hangs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _dist_helpers import run_ranks

from hf_adamp import kernels
from hf_adamp.kernels import tables

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_kernel_build_worker.py")
TIMEOUT = 300  # seconds; only a hang gets near it

pytestmark = pytest.mark.skipif(kernels._compiler() is None, reason="no C++ compiler: nothing is built here")


def package_copy(dest: Path, extra_source: str = "") -> Path:
    """A copy of the hf_adamp package under ``dest`` (a PYTHONPATH root), its kernel source optionally extended."""
    shutil.copytree(ROOT / "hf_adamp", dest / "hf_adamp", ignore=shutil.ignore_patterns("__pycache__"))
    if extra_source:
        source = dest / "hf_adamp" / "kernels" / "adamp_cpu.cpp"
        source.write_text(source.read_text() + extra_source)
    return dest


def worker_env(cache: Path, package_root: Path = ROOT, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (kernels.DISABLE_ENV, kernels.CACHE_ENV, "CXX")}
    return dict(env, TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=str(package_root), OMP_NUM_THREADS="1", **extra)


def start(out: Path, env: dict[str, str], **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), str(out)]
    return subprocess.Popen(
        cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    """The worker's RESULT and its log (stderr)."""
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the worker hung:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), stderr


def build_dirs(cache: Path) -> list[Path]:
    return sorted(p.parent for p in cache.glob("hf_adamp/*/libhf_adamp_cpu.so"))


def weights(path: Path) -> list[torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_killed_builder_does_not_block_the_next_process(tmp_path):
    """A builder killed (SIGKILL) while it holds the build lock, with half an output written: the next process
    builds at once (no wait on the dead builder's lock) and never loads the half-written file."""
    cache, marker = tmp_path / "cache", tmp_path / "compiling"
    slow_cxx = tmp_path / "slow-c++"
    slow_cxx.write_text(
        f"#!{sys.executable}\n"
        "import os, sys, time\n"
        "args = sys.argv[1:]\n"
        "if '--version' in args:\n"
        "    os.execvp('c++', ['c++', *args])\n"
        "with open(args[args.index('-o') + 1], 'wb') as f:\n"  # half an output, then hang as if compiling
        "    f.write(b'\\x7fELF half written')\n"
        f"open({str(marker)!r}, 'w').close()\n"
        "time.sleep(600)\n"
    )
    slow_cxx.chmod(0o755)
    killed = start(tmp_path / "killed.pt", worker_env(cache, CXX=str(slow_cxx)), start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[1][-3000:]
            time.sleep(0.1)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the builder and its compiler, mid-build
        killed.communicate()
    (lock,) = cache.glob("hf_adamp/*/lock")
    assert list(lock.parent.glob("*.tmp")), "the killed builder left its half-written output"

    result, log = finish(start(tmp_path / "next.pt", worker_env(cache)))
    assert result["available"] and result["built"], log
    assert "waiting for" not in log, "the lock of a dead builder must not be waited for"
    assert Path(result["path"]).parent == lock.parent
    assert not list(lock.parent.glob("*.tmp"))


def test_live_builder_is_waited_for_with_a_log_line(tmp_path, monkeypatch):
    """While a live process holds the build lock (this test, posing as a builder), the next process says whom it
    waits for, and builds once the lock is released."""
    import fcntl

    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    monkeypatch.delenv(kernels.CACHE_ENV, raising=False)
    spec = kernels.BuildSpec(kernels._compiler())
    spec.dir.mkdir(parents=True)
    fd = os.open(spec.dir / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    log = tmp_path / "waiter.log"
    with log.open("w") as stderr:
        out = tmp_path / "waiter.pt"
        waiter = subprocess.Popen(
            [sys.executable, str(WORKER), str(out)],
            cwd=tmp_path,
            env=worker_env(cache),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            line = f"waiting for the hf_adamp CPU kernels being built by pid {os.getpid()}"
            deadline = time.monotonic() + TIMEOUT
            while line not in log.read_text():
                assert waiter.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
        finally:
            os.close(fd)  # the builder is done: the lock is free
        stdout, _ = waiter.communicate(timeout=TIMEOUT)
    assert waiter.returncode == 0, log.read_text()[-3000:]
    result = json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    assert result["available"] and result["built"] and Path(result["path"]).parent == spec.dir


def test_two_sources_started_together_each_run_their_own(tmp_path):
    """Two copies of the package whose kernel sources differ, first used at the same time on one cache: each
    builds and loads its own library (the copy with the extra function finds it; the other does not)."""
    cache = tmp_path / "cache"
    plain = package_copy(tmp_path / "plain")
    marked = package_copy(tmp_path / "marked", '\nextern "C" int hf_adamp_test_marker() { return 1; }\n')
    procs = [start(tmp_path / f"{root.name}.pt", worker_env(cache, root)) for root in (plain, marked)]
    (a, _), (b, _) = (finish(p) for p in procs)
    assert a["package"].startswith(str(plain)) and b["package"].startswith(str(marked))
    assert a["available"] and b["available"]
    assert (a["marker"], b["marker"]) == (False, True)
    assert a["key"] != b["key"] and a["path"] != b["path"]
    assert a["built"] and b["built"]
    assert len(build_dirs(cache)) == 2


def test_same_source_from_two_install_paths_builds_once(tmp_path):
    """Built ahead of time (``python -m hf_adamp.kernels build``) from one install path, the library is loaded,
    not rebuilt, by the same source at another path."""
    cache = tmp_path / "cache"
    first, second = package_copy(tmp_path / "env1"), package_copy(tmp_path / "env2")
    cmd = [sys.executable, "-m", "hf_adamp.kernels", "build"]
    done = subprocess.run(
        cmd, cwd=tmp_path, env=worker_env(cache, first), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "built:      yes" in done.stdout and "building hf_adamp CPU kernels" in done.stderr
    (built,) = build_dirs(cache)
    result, log = finish(start(tmp_path / "env2.pt", worker_env(cache, second)))
    assert result["package"].startswith(str(second))
    assert result["available"] and not result["built"], log
    assert Path(result["path"]).parent == built and build_dirs(cache) == [built]
    assert "building" not in log


def test_two_processes_on_an_empty_cache_build_once_and_agree(tmp_path):
    """Two first uses at the same time on an empty cache: one builds, the other waits for it or loads its result;
    both finish with the same weights."""
    cache = tmp_path / "cache"
    procs = [start(tmp_path / f"p{i}.pt", worker_env(cache)) for i in range(2)]
    (a, log_a), (b, log_b) = (finish(p) for p in procs)
    assert a["available"] and b["available"] and a["path"] == b["path"]
    assert [a["built"], b["built"]].count(True) == 1, log_a + log_b
    assert (log_a + log_b).count("building hf_adamp CPU kernels") == 1
    for x, y in zip(weights(tmp_path / "p0.pt"), weights(tmp_path / "p1.pt")):
        assert torch.equal(x, y)


def test_no_compiler_one_warning_and_the_eager_path(tmp_path):
    """Without a compiler: one warning that says so, and exactly the eager path's weights."""
    cache = tmp_path / "cache"
    result, log = finish(start(tmp_path / "none.pt", worker_env(cache, CXX=str(tmp_path / "missing-c++"))))
    assert not result["available"]
    warnings = [line for line in log.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "eager path" in warnings[0], log
    eager, _ = finish(start(tmp_path / "eager.pt", worker_env(cache, **{kernels.DISABLE_ENV: "1"})))
    assert not eager["available"]
    for x, y in zip(weights(tmp_path / "none.pt"), weights(tmp_path / "eager.pt")):
        assert torch.equal(x, y)
    assert not cache.exists() or not build_dirs(cache)


def test_failed_build_reports_the_first_compiler_error_and_keeps_the_log(tmp_path, monkeypatch, caplog, capsys):
    """The warning names the compiler's first error and the full log; so does ``python -m hf_adamp.kernels``."""
    from hf_adamp.kernels.__main__ import report

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(kernels.CACHE_ENV, raising=False)
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    broken = tmp_path / "adamp_cpu.cpp"
    broken.write_text(kernels._SOURCE.read_text().replace("namespace {", "namespace { not_a_type x;", 1))
    monkeypatch.setattr(kernels, "_SOURCE", broken)
    for name in ("_module", "_failed", "_agreed"):
        monkeypatch.setattr(kernels, name, None)
    with caplog.at_level(logging.WARNING, logger="hf_adamp.kernels"):
        assert not kernels.available()
    (line,) = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert "build failed" in line and "error" in line and "not_a_type" in line, line
    log = Path(line.split("full log: ")[1].split(")")[0])
    assert log.is_file() and "not_a_type" in log.read_text() and "exit code" in log.read_text()
    capsys.readouterr()
    assert not report()
    out = capsys.readouterr().out
    assert "the last build failed" in out and "not_a_type" in out and str(log) in out, out


def test_table_layout_mismatch_is_refused(tmp_path, monkeypatch, caplog):
    """A library whose tables differ from the Python declarations (two scalar columns swapped in the C++ lists)
    builds, but is refused at load: a warning naming the difference, and the eager path."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(kernels.CACHE_ENV, raising=False)
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    source = kernels._SOURCE.read_text()
    swapped = source.replace("X(kBeta1, beta1) X(kBeta2, beta2)", "X(kBeta2, beta2) X(kBeta1, beta1)", 1)
    assert swapped != source
    changed = tmp_path / "adamp_cpu.cpp"
    changed.write_text(swapped)
    monkeypatch.setattr(kernels, "_SOURCE", changed)
    for name in ("_module", "_failed", "_agreed"):
        monkeypatch.setattr(kernels, name, None)
    with caplog.at_level(logging.WARNING, logger="hf_adamp.kernels"):
        assert not kernels.available()
    (line,) = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert "table layout differs" in line and "beta2=0" in line and "eager path" in line, line


def test_layout_check_compares_with_the_python_declarations(monkeypatch):
    """The loaded library's layout matches ``kernels.tables``; a changed declaration would be refused."""
    if not kernels.available():
        pytest.skip("the kernels are switched off here")
    lib = kernels.module()
    kernels.check_layout(lib.lib, lib.path)
    monkeypatch.setattr(kernels, "layout_text", lambda: tables.layout_text().replace("mode=4", "mode=5"))
    with pytest.raises(kernels.BuildError, match="table layout differs.*mode=4"):
        kernels.check_layout(lib.lib, lib.path)


def test_one_openmp_runtime_in_the_process():
    """The library uses the OpenMP runtime torch has loaded, not a second one of its own."""
    if not kernels.available():
        pytest.skip("the fused kernels are unavailable here")
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc")
    runtimes = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


def _rank_steps(rank: int, world: int, cache: str) -> dict:
    """A DDP model stepped by hf_adamp.AdamP; rank 1 has no compiler."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import hf_adamp

    os.environ["TORCH_EXTENSIONS_DIR"] = cache
    if rank == 1:
        os.environ["CXX"] = os.path.join(cache, "missing-c++")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    ddp = DistributedDataParallel(model)
    opt = hf_adamp.AdamP(ddp.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(20):
        x, y = torch.randn(16, 32, generator=gen), torch.randn(16, 8, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return {"fused": kernels.available(), "weights": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.distributed
def test_ranks_agree_when_one_cannot_build(tmp_path):
    """Two gloo ranks, one without a compiler: both use the eager path, and their replicas stay equal."""
    cache = tmp_path / "cache"
    cache.mkdir()
    r0, r1 = run_ranks(_rank_steps, 2, tmp_path, str(cache))
    assert r0["fused"] is False and r1["fused"] is False
    for a, b in zip(r0["weights"], r1["weights"]):
        assert torch.equal(a, b)
