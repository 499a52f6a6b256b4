"""Report on hf_adamp's fused CPU kernels, or build them ahead of time.

python -m hf_adamp.kernels          # built? for which ISA, where cached, build time; why not, if unavailable
python -m hf_adamp.kernels build    # build now (or load the cached build), then report; exit 1 if it fails
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from . import (
    DISABLE_ENV,
    BuildError,
    BuildSpec,
    _compiler,
    _cpu_flags,
    _first_error,
    _open,
    _recorded,
    available,
    cache_root,
    disabled_by_env,
)


def report() -> bool:
    """Prints the report; True when the kernels are built and load."""
    isa = " ".join(_cpu_flags()) or "x86-64 baseline (no AVX2/FMA)"
    print("hf_adamp fused CPU kernels")
    print(f"  ISA:        {isa}")
    print(f"  cache root: {cache_root()}")
    if disabled_by_env():
        print(f"  disabled:   {DISABLE_ENV} is set, the optimizers use the eager path")
    cxx = _compiler()
    if cxx is None:
        print("  compiler:   none found (set CXX, or install g++); the optimizers use the eager path")
        return False
    try:
        spec = BuildSpec(cxx)
    except BuildError as exc:
        print(f"  compiler:   {cxx} unusable: {exc}")
        return False
    print(f"  compiler:   {cxx} ({spec.compiler})")
    print(f"  build key:  {spec.key}")
    print(f"  build dir:  {spec.dir}")
    if not spec.library.exists():
        if spec.log.exists():
            text = spec.log.read_text(errors="replace")
            print(f"  built:      no; the last build failed: {_first_error(text, -1)}")
            print(f"  build log:  {spec.log}")
        else:
            print("  built:      no (it is built on the first fused step, or by: python -m hf_adamp.kernels build)")
        return False
    record = _recorded(spec.record)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["built_at"])) if "built_at" in record else "?"
    seconds = f"{record['seconds']:.1f} s" if "seconds" in record else "unknown time"
    print(f"  built:      yes, in {seconds}, at {when}")
    try:
        _open(spec, built=False)
    except BuildError as exc:
        print(f"  loads:      no: {exc}")
        return False
    print(f"  loads:      yes ({spec.library})")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hf_adamp.kernels", description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", choices=["report", "build"], default="report")
    args = ap.parse_args(argv)
    if args.command == "build":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        if disabled_by_env():
            print(f"{DISABLE_ENV} is set: nothing to build", file=sys.stderr)
            return 1
        available()
    built = report()
    return 0 if built or args.command == "report" else 1


if __name__ == "__main__":
    sys.exit(main())
