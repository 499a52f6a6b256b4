"""Fused CPU kernels of the AdamP and SGDP steps: a plain shared library, built on first use, called with ctypes.

``adamp_cpu.cpp`` needs no torch headers: the system C++ compiler builds it in a few seconds into a library
with a C interface (raw pointers, sizes, dtype codes), which ``CpuKernels`` calls with the tensors' data
pointers after checking their layouts. The build is cached by content: its directory is named after a hash of
the source, the compiler flags and the compiler's version, so a changed source never loads an old library, and
the same source from another checkout or virtual environment reuses it. The cache root is ``HF_ADAMP_CACHE_DIR``,
else ``$TORCH_EXTENSIONS_DIR/hf_adamp``, else ``~/.cache/hf_adamp``.

One process builds while the others wait on an ``fcntl.flock`` lock (released by the kernel when its holder
dies, so a killed builder never leaves a lock behind), with a log line every few seconds; the library is
compiled to a temporary file and renamed into place, so a kill at any moment leaves a usable cache or none.

Where no C++ compiler is found, or the build fails, or ``HF_ADAMP_DISABLE_FUSED=1`` is set, ``available()`` is
False, one log line says why (a failed build: the compiler's first error and where its full log is), and the
optimizers use their eager (chunked torch ops) path. In a distributed run the ranks agree at the first call
(one all-reduce): either all use the kernels or none does. ``python -m hf_adamp.kernels`` prints a report;
``python -m hf_adamp.kernels build`` builds ahead of time.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import operator
import os
import re
import shutil
import subprocess
import threading
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from .._tensors import is_dense
from .tables import DTYPE_CODES, RUN_COLS, SCALAR_COLUMNS, TENSORS_PER_PARAM, layout_text

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked against each other
    fcntl = None

logger = logging.getLogger(__name__)

DISABLE_ENV = "HF_ADAMP_DISABLE_FUSED"
CACHE_ENV = "HF_ADAMP_CACHE_DIR"
WAIT_ENV = "HF_ADAMP_BUILD_WAIT_S"  # the longest wait for another process's build (default 600 s)
_SOURCE = Path(__file__).with_name("adamp_cpu.cpp")
_LIBRARY = "libhf_adamp_cpu.so"
_BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
_LINK_FLAGS = ["-shared", "-fopenmp"]  # libgomp.so.1: the OpenMP runtime torch has loaded already
_PARTS = 2  # translation units compiled in parallel on an idle machine (adamp_cpu.cpp: HF_ADAMP_PART)
_WAIT_LOG_S = 5.0  # seconds between the lines of a wait for another process's build
_DEFAULT_BUILD_S = 10  # the announced build time before any build was recorded on this machine
_ERROR_BYTES = 1024

_module: CpuKernels | None = None
_failed: str | None = None  # why the kernels are unavailable here, once known
_agreed: bool | None = None  # the ranks' common answer in a distributed run, once agreed
_load_lock = threading.Lock()  # threads of one process build or load once
build_seconds: float | None = None  # wall time of the load in this process (build, or load from cache)


class BuildError(RuntimeError):
    """The kernels could not be built or loaded; the message is one line."""


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _cpu_flags() -> list[str]:
    """-mavx2 -mfma where this CPU has them (they double the vector width over the x86-64 baseline)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    words = set(info.split())
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= words else []


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "hf_adamp"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_adamp"


def _compiler_version(cxx: str) -> str:
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"{cxx} --version failed: {exc}") from exc
    return (done.stdout.strip().splitlines() or [f"{cxx} (no version)"])[0]


class BuildSpec:
    """What a build is made of, and where it is cached: a directory named by the hash of all of it."""

    def __init__(self, cxx: str, source: bytes | None = None) -> None:
        self.cxx = cxx
        self.source = _SOURCE.read_bytes() if source is None else source
        self.isa = _cpu_flags()
        self.compiler = _compiler_version(cxx)
        self.flags = _BASE_FLAGS + self.isa
        digest = hashlib.sha256()
        recipe = f"{' '.join(self.flags)} | {' '.join(_LINK_FLAGS)}"
        for part in (self.source, recipe.encode(), self.compiler.encode()):
            digest.update(len(part).to_bytes(8, "little") + part)
        self.key = digest.hexdigest()[:20]
        self.dir = cache_root() / f"cpu-{'avx2' if self.isa else 'base'}-{self.key}"
        self.library = self.dir / _LIBRARY
        self.log = self.dir / "build.log"
        self.record = self.dir / "build.json"


def _recorded(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _expected_seconds() -> int:
    """The last build time recorded on this machine (any source), else a default."""
    times = [(r.get("built_at", 0), r.get("seconds")) for r in map(_recorded, cache_root().glob("*/build.json"))]
    known = sorted(t for t in times if isinstance(t[1], (int, float)))
    return max(1, round(known[-1][1])) if known else _DEFAULT_BUILD_S


def _lock_holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Holds the build lock of a cache directory; waits (logging) while another live process holds it."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        limit = float(os.environ.get(WAIT_ENV, "600"))
        start, last_log = time.monotonic(), -_WAIT_LOG_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now - start > limit:
                    raise BuildError(
                        f"gave up after {limit:.0f} s waiting for pid {_lock_holder(fd)} to build in {directory}"
                    ) from None
                if now - last_log >= _WAIT_LOG_S:
                    logger.warning(
                        "hf_adamp: waiting for the hf_adamp CPU kernels being built by pid %s (%.0f s so far, in %s)",
                        _lock_holder(fd),
                        now - start,
                        directory,
                    )
                    last_log = now
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _first_error(output: str, returncode: int) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror\b", line, re.IGNORECASE):
            return line
    return lines[-1] if lines else f"the compiler exited with code {returncode}"


def _parallel_parts() -> list[list[str]]:
    """The units to compile: the source's parts side by side where cores are idle, else the whole source as one
    (the parts share some code, so on a busy machine one unit finishes first). The library is the same."""
    cores = os.cpu_count() or 1
    idle = cores - os.getloadavg()[0] if hasattr(os, "getloadavg") else 0
    if cores >= _PARTS and idle >= _PARTS - 0.5:
        return [[f"-DHF_ADAMP_PART={k}"] for k in range(_PARTS)]
    return [[]]


def _compile(spec: BuildSpec) -> float:
    """Compiles the library into the cache directory (atomically) and records the build; returns its seconds.

    Most of the time goes to the kernels' template instances, so where cores are idle the source's parts are
    compiled side by side; the objects are linked into a temporary file that is renamed into place."""
    for stale in spec.dir.glob("*.tmp"):  # left by killed builders (the lock is ours, so nobody writes them)
        stale.unlink(missing_ok=True)
    pid = os.getpid()
    source = spec.dir / _SOURCE.name
    tmp_source = spec.dir / f"{_SOURCE.name}.{pid}.tmp"
    tmp_source.write_bytes(spec.source)
    os.replace(tmp_source, source)
    parts = _parallel_parts()
    objects = [spec.dir / f"part{k}.{pid}.o.tmp" for k in range(len(parts))]
    tmp_library = spec.dir / f"{_LIBRARY}.{pid}.tmp"
    define = f'-DHF_ADAMP_BUILD_KEY="{spec.key}"'
    compiles = [
        [spec.cxx, *spec.flags, define, *part, "-c", str(source), "-o", str(obj)] for part, obj in zip(parts, objects)
    ]
    link = [spec.cxx, *map(str, objects), *_LINK_FLAGS, "-o", str(tmp_library)]
    logger.warning(
        "hf_adamp: building hf_adamp CPU kernels, first use on this machine, about %d s (%s)",
        _expected_seconds(),
        spec.dir,
    )
    t0 = time.perf_counter()
    log: list[str] = []
    try:
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in compiles]
        steps = [(cmd, proc.communicate()[0], proc.returncode) for cmd, proc in zip(compiles, procs)]
        if all(code == 0 for _, _, code in steps):
            done = subprocess.run(link, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            steps.append((link, done.stdout, done.returncode))
    except OSError as exc:
        raise BuildError(f"could not run {spec.cxx}: {exc}") from exc
    finally:
        for obj in objects:
            obj.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    for cmd, output, code in steps:
        log.append(f"$ {' '.join(cmd)}\n{output}exit code {code}\n")
    spec.log.write_text("".join(log) + f"{seconds:.1f} s\n")
    failed = [(output, code) for _, output, code in steps if code != 0]
    if failed:
        tmp_library.unlink(missing_ok=True)
        raise BuildError(f"{_first_error(*failed[0])} (full log: {spec.log})")
    os.replace(tmp_library, spec.library)
    record = dict(seconds=round(seconds, 2), built_at=time.time(), compiler=spec.compiler, flags=spec.flags, pid=pid)
    spec.record.write_text(json.dumps(record, indent=1))
    logger.warning("hf_adamp: built hf_adamp CPU kernels in %.1f s; cached in %s", seconds, spec.dir)
    return seconds


def _open(spec: BuildSpec, built: bool) -> CpuKernels:
    try:
        lib = ctypes.CDLL(str(spec.library))
    except OSError as exc:
        raise BuildError(f"could not load {spec.library}: {exc}") from exc
    try:
        lib.hf_adamp_build_key.restype = ctypes.c_char_p
    except AttributeError as exc:
        raise BuildError(f"{spec.library} is not an hf_adamp kernels library") from exc
    found = lib.hf_adamp_build_key().decode()
    if found != spec.key:  # never run a library built from another source
        raise BuildError(f"{spec.library} was built for key {found}, expected {spec.key}")
    check_layout(lib, spec.library)
    return CpuKernels(lib, spec, built)


def check_layout(lib: ctypes.CDLL, path: Path | str) -> None:
    """Refuse a library whose tables (run columns, modes, scalar columns, dtype codes) differ from the Python
    declarations in ``kernels.tables``: the two would silently misread each other's numbers."""
    try:
        lib.hf_adamp_layout.restype = ctypes.c_char_p
    except AttributeError as exc:
        raise BuildError(f"{path} does not export its table layout (hf_adamp_layout)") from exc
    found, expected = lib.hf_adamp_layout().decode(), layout_text()
    if found != expected:
        differ = next(
            (f"{a!r} against {b!r}" for a, b in zip(found.split(";"), expected.split(";")) if a != b),
            f"{found!r} against {expected!r}",
        )
        raise BuildError(f"{path}: the kernels' table layout differs from hf_adamp.kernels.tables: {differ}")


def load(spec: BuildSpec) -> CpuKernels:
    """The kernels of ``spec``: loaded from the cache, or built there first (once, whoever asks at the time)."""
    if spec.library.exists():
        try:
            return _open(spec, built=False)
        except BuildError as exc:
            logger.warning("hf_adamp: %s; rebuilding", exc)
    spec.dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(spec.dir):
        if spec.library.exists():  # built while we waited, or unloadable above
            try:
                return _open(spec, built=False)
            except BuildError:
                spec.library.unlink(missing_ok=True)
        _compile(spec)
        return _open(spec, built=True)


def _build() -> CpuKernels:
    cxx = _compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found")
    return load(BuildSpec(cxx))


def _local_available() -> bool:
    """Builds (or loads) the kernels on the first call in this process; False, logged once, where they cannot be."""
    global _module, _failed, build_seconds
    if _module is not None:
        return True
    with _load_lock:
        if _module is not None:
            return True
        if _failed is not None:
            return False
        if _compiler() is None:
            _failed = "no C++ compiler found"
        else:
            t0 = time.perf_counter()
            try:
                _module = _build()
                build_seconds = time.perf_counter() - t0
                return True
            except Exception as exc:  # any build or load failure means: use the eager path
                text = str(exc).strip().splitlines() or [""]
                if isinstance(exc, BuildError):
                    _failed = f"build failed: {text[0]}"
                else:
                    _failed = f"build failed ({type(exc).__name__}: {text[-1]})"
        logger.warning("hf_adamp: fused CPU kernels unavailable (%s); using the eager path", _failed)
        return False


def _agree(local: bool) -> bool:
    """All ranks of the default process group use the kernels only if every rank has them (one all-reduce)."""
    import torch.distributed as dist

    backend = str(dist.get_backend())
    on_gpu = "gloo" not in backend and "mpi" not in backend and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    agreed = bool(flag.item())
    ranks = dist.get_world_size()
    if agreed:
        logger.info("hf_adamp: all %d ranks use the fused CPU kernels", ranks)
    elif local:
        logger.warning(
            "hf_adamp: another rank lacks the fused CPU kernels, so all %d ranks use the eager path (equal replicas)",
            ranks,
        )
    else:
        logger.warning("hf_adamp: this rank lacks the fused CPU kernels, so all %d ranks use the eager path", ranks)
    return agreed


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def available() -> bool:
    """True when the fused kernels can be used; builds (or loads the cached build) on the first call.

    In a distributed run the first call is collective (every rank must make it, as every rank's first optimizer
    step does), and ``HF_ADAMP_DISABLE_FUSED`` must be set alike on all ranks.
    """
    global _agreed
    if disabled_by_env():
        return False
    local = _local_available()
    if _agreed is None and _distributed():
        _agreed = _agree(local)
    return local if _agreed is None else _agreed and local


def unavailable_reason() -> str:
    """Why ``available()`` is False here (for error messages)."""
    if disabled_by_env():
        return f"{DISABLE_ENV}=1 is set"
    if _failed is not None:
        return _failed
    if _agreed is False:
        return "another rank lacks them"
    return "not loaded"


def module() -> CpuKernels:
    """The loaded kernels; only call after ``available()`` returned True."""
    assert _module is not None, "hf_adamp.kernels.available() must be called first"
    return _module


def reset() -> None:
    """Forget a failed build and the ranks' agreement, so the next ``available()`` tries again (tests)."""
    global _failed, _agreed
    _failed = _agreed = None


# ------------------------------------------------------------------------------------------------ the C calls
_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
_TABLE = [_P, _P, _P, _I64, _P, _I64, _P, _I64]  # tensors (pointers, numels, dtypes, count), runs, scalars
_FIRST = [*_TABLE, _P, _I32, _I64, _I64, _P, _I32, _I64, _I32, _P, _I64]
_SECOND = [*_TABLE, _P, _I32, _I64, _P, _I32, _I64, _P, _I32, _I64, _P, _I32, _P, _I64]
_ARGTYPES = {
    "hf_adamp_adam_first": _FIRST,
    "hf_adamp_adam_second": _SECOND,
    "hf_adamp_sgd_first": _FIRST,
    "hf_adamp_sgd_second": _SECOND,
    "hf_adamp_decide": [_P, _I32, _I64, _I64, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _P, _P, _I64],
}


def _fail(what: str) -> None:
    raise RuntimeError(f"hf_adamp fused: {what}")


def _code(t: Tensor, what: str) -> int:
    code = DTYPE_CODES.get(t.dtype)
    if code is None or not t.is_cpu:
        _fail(f"{what} must be a float32/float64/float16/bfloat16 CPU tensor (got {t.dtype} on {t.device})")
    return code


def _vector(t: Tensor, what: str) -> tuple[int, int, int]:
    """A contiguous 1-D CPU tensor as (pointer, elements, dtype code)."""
    code = _code(t, what)
    if t.dim() != 1 or not t.is_contiguous():
        _fail(f"{what} must be a contiguous vector")
    return t.data_ptr(), t.numel(), code


def _table(t: Tensor, dtype: torch.dtype, cols: int | None, what: str) -> tuple[int, int]:
    """A contiguous (R, cols) CPU table as (pointer, rows)."""
    if not (t.is_cpu and t.dtype == dtype and t.dim() == 2 and t.is_contiguous()) or cols not in (None, t.shape[1]):
        _fail(f"{what} must be a contiguous {dtype} CPU table with {cols or 'any number of'} columns")
    return t.data_ptr(), t.shape[0]


def _stats(t: Tensor) -> tuple[int, int, int, int]:
    code = _code(t, "stats")
    if t.dim() != 2 or t.shape[0] != 4 or t.stride(1) != 1:
        _fail("stats must be a (4, rows) tensor with contiguous rows")
    return t.data_ptr(), code, t.stride(0), t.shape[1]


def _check_set(group: list[Tensor]) -> None:
    """The tensors of a parameter (gradient, parameter, state...) are addressed as flat storage, so they must
    share its dense layout, with the first dimension outermost (rows contiguous)."""
    param = group[1]
    shape = param.shape
    contiguous = param.is_contiguous()
    strides = None
    if not contiguous:
        strides = param.stride()
        if not is_dense(param):
            _fail("the parameter is not dense")
        if param.dim() > 1 and strides[0] * shape[0] != param.numel():
            _fail("the parameter's first dimension is not outermost")
    for t in group:
        if not t.is_cpu:
            _fail("every tensor must be on the CPU")
        # equal shapes, both contiguous: the same flat layout (a cheaper test than comparing strides)
        if t.shape != shape or not (t.is_contiguous() if contiguous else t.stride() == strides):
            _fail("gradient or state laid out unlike the parameter")


class TensorTable:
    """What a kernel call reads of its tensors: per tensor its data pointer, elements and dtype code.

    ``tensors`` come in sets of ``per`` (gradient, parameter, state...), each set checked by ``_check_set``. The
    cpu backend makes one table per step, read by both passes, and hands it the table of the step before
    (``known``): a set whose parameter and state tensors are the same objects at the same addresses, with the same
    elements and dtypes, was checked then, so only its gradient (a new tensor every step) is checked again.
    Pointers, elements and dtypes are read anew at every step: the C side bounds every run by them.
    """

    def __init__(self, tensors: list[Tensor], per: int, known: TensorTable | None = None) -> None:
        if len(tensors) % per:
            _fail("tensors are not whole tensor sets")
        ptrs = [t.data_ptr() for t in tensors]
        numels = [t.numel() for t in tensors]
        codes = [DTYPE_CODES.get(t.dtype, -1) for t in tensors]
        if known is not None and (known.per != per or len(known.kept) != len(tensors)):
            known = None
        for base in range(0, len(tensors), per):
            group = tensors[base : base + per]
            rest = slice(base + 1, base + per)
            if (
                known is not None
                and all(map(operator.is_, group[1:], known.kept[rest]))
                and ptrs[rest] == known.ptrs[rest]
                and numels[rest] == known.numels[rest]
                and codes[rest] == known.codes[rest]
            ):
                _check_set(group[:2])  # the gradient against the parameter
            else:
                _check_set(group)
        self.per = per
        self.kept = [None if i % per == 0 else t for i, t in enumerate(tensors)]  # no gradient outlives its step
        self.ptrs, self.numels, self.codes = ptrs, numels, codes
        self.arrays = (array("Q", ptrs), array("q", numels), array("i", codes))  # what the C side reads


def _address(a: array) -> int:
    return a.buffer_info()[0]


class CpuKernels:
    """The loaded library; its methods take tensors, check their layouts and call the C entry points.

    ``adam_first``/``sgd_first(tensors, runs, scalars, stats, spec_coef)``: pass 1 of every run (moments, row sums;
    finishes full and speculated runs). ``adam_second``/``sgd_second(tensors, runs, scalars, coef, spec_coef,
    decay)``: pass 2 (projection, decay, step, or a repair); returns the rows written per run. ``tensors`` is a list
    (checked at each call) or a ``TensorTable``. ``decide(stats, counts, row_len, numel, delta, eps)``:
    ``projection.decide`` on a CPU stats buffer.
    """

    def __init__(self, lib: ctypes.CDLL, spec: BuildSpec, built: bool) -> None:
        self.lib, self.path, self.key, self.built = lib, spec.library, spec.key, built
        self.isa = spec.isa
        for name, argtypes in _ARGTYPES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        self._decide = lib.hf_adamp_decide

    def adam_first(self, tensors: list[Tensor], runs: Tensor, scalars: Tensor, stats: Tensor, spec_coef: Tensor):
        self._pass1("adam", tensors, runs, scalars, stats, spec_coef)

    def sgd_first(self, tensors: list[Tensor], runs: Tensor, scalars: Tensor, stats: Tensor, spec_coef: Tensor):
        self._pass1("sgd", tensors, runs, scalars, stats, spec_coef)

    def adam_second(self, tensors, runs, scalars, coef: Tensor, spec_coef: Tensor, decay: Tensor) -> Tensor:
        return self._pass2("adam", tensors, runs, scalars, coef, spec_coef, decay)

    def sgd_second(self, tensors, runs, scalars, coef: Tensor, spec_coef: Tensor, decay: Tensor) -> Tensor:
        return self._pass2("sgd", tensors, runs, scalars, coef, spec_coef, decay)

    @staticmethod
    def _call(fn, *args) -> None:
        err = ctypes.create_string_buffer(_ERROR_BYTES)
        if fn(*args, err, _ERROR_BYTES) != 0:
            raise RuntimeError(err.value.decode(errors="replace"))

    @staticmethod
    def _runs(kind: str, tensors: list[Tensor] | TensorTable, runs: Tensor, scalars: Tensor) -> tuple[list, tuple]:
        """The leading arguments of a pass (tensor table, runs, scalars), and the arrays they point into
        (the caller keeps them alive through the call)."""
        per = TENSORS_PER_PARAM[kind]
        table = tensors if isinstance(tensors, TensorTable) else TensorTable(tensors, per)
        if table.per != per:
            _fail(f"a table of tensor sets of {table.per} given to the {kind} kernels (sets of {per})")
        arrays = table.arrays
        runs_ptr, count = _table(runs, torch.int64, RUN_COLS, "runs")
        scalars_ptr, scalar_rows = _table(scalars, torch.float64, len(SCALAR_COLUMNS[kind]), "scalars")
        if scalar_rows != count:
            _fail("scalars must have a row per run")
        head = [*map(_address, arrays), len(table.kept), runs_ptr, count]
        return [*head, scalars_ptr, scalars.shape[1]], arrays

    def _pass1(self, kind: str, tensors, runs: Tensor, scalars: Tensor, stats: Tensor, spec_coef: Tensor) -> None:
        head, arrays = self._runs(kind, tensors, runs, scalars)  # arrays: alive through the call
        spec_ptr, spec_n, spec_code = _vector(spec_coef, "spec_coef")
        stats_ptr, stats_code, stride, rows = _stats(stats)
        tail = [spec_ptr, spec_code, spec_n, torch.get_num_threads()]
        self._call(getattr(self.lib, f"hf_adamp_{kind}_first"), *head, stats_ptr, stats_code, stride, rows, *tail)

    def _pass2(self, kind: str, tensors, runs, scalars, coef: Tensor, spec_coef: Tensor, decay: Tensor) -> Tensor:
        head, arrays = self._runs(kind, tensors, runs, scalars)  # arrays: alive through the call
        written = torch.zeros(runs.shape[0], dtype=torch.int64)
        coef_ptr, coef_n, coef_code = _vector(coef, "coef")
        spec_ptr, spec_n, spec_code = _vector(spec_coef, "spec_coef")
        decay_ptr, decay_n, decay_code = _vector(decay, "decay")
        bufs = [coef_ptr, coef_code, coef_n, spec_ptr, spec_code, spec_n, decay_ptr, decay_code, decay_n]
        self._call(
            getattr(self.lib, f"hf_adamp_{kind}_second"), *head, *bufs, written.data_ptr(), torch.get_num_threads()
        )
        return written

    def decide(self, stats: Tensor, counts, row_len, numel, delta, eps) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """coef (per row), projected, kind and weight_norm (per slot) of the decision on a CPU stats buffer."""
        stats_ptr, code, stride, rows = _stats(stats)
        slots = counts.numel()
        per_slot = (row_len, numel, delta, eps)
        if counts.dtype != torch.int64 or not counts.is_contiguous() or not all(t.is_cpu for t in (counts, *per_slot)):
            _fail("decide: counts must be a contiguous int64 CPU tensor")
        if any(t.dtype != torch.float64 or t.numel() != slots or not t.is_contiguous() for t in per_slot):
            _fail("decide: per-slot arguments must be contiguous float64 CPU tensors of one length")
        coef = torch.empty(rows, dtype=stats.dtype)
        projected = torch.empty(slots, dtype=torch.bool)
        kind = torch.empty(slots, dtype=torch.int8)
        weight_norm = torch.empty(slots, dtype=stats.dtype)
        ptrs = [t.data_ptr() for t in (counts, *per_slot)]
        outs = [t.data_ptr() for t in (coef, projected, kind, weight_norm)]
        self._call(self._decide, stats_ptr, code, stride, rows, *ptrs, slots, *outs)
        return coef, projected, kind, weight_norm
