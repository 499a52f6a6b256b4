"""Run an unmodified training script with hf-adamp switched on: ``python -m hf_adamp [options] SCRIPT.py [args]``.

The script runs as ``__main__`` (``runpy.run_path``) with ``sys.argv`` set to ``[SCRIPT.py, *args]`` and the
script's folder first on ``sys.path``, as ``python SCRIPT.py args`` would run it, after ``import hf_adamp`` has
registered ``--optim adamp|sgdp|radam``. The same module works under ``torchrun -m hf_adamp`` and
``accelerate launch -m hf_adamp``: both start each rank as ``python -m hf_adamp <the rest>``. An exception in
the script keeps its traceback and exit status; ``sys.exit(n)`` in the script exits with n.

Every option has an environment-variable twin, for launchers that cannot pass options to the module; an
option given on the command line wins over its variable.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .integrations import launch_hooks  # importing hf_adamp.launch ran hf_adamp/__init__: options registered

ENV_WEIGHT_NORM = "HF_ADAMP_WEIGHT_NORM"
ENV_WEIGHT_NORM_INCLUDE = "HF_ADAMP_WEIGHT_NORM_INCLUDE"
ENV_WEIGHT_NORM_EXCLUDE = "HF_ADAMP_WEIGHT_NORM_EXCLUDE"
ENV_WEIGHT_NORM_FAMILY = "HF_ADAMP_WEIGHT_NORM_FAMILY"
ENV_LOG_PROJECTION = "HF_ADAMP_LOG_PROJECTION"

# What the legacy ``torch.distributed.launch`` puts before the script: it belongs to the script.
_SCRIPT_OPTIONS = ("--local-rank", "--local_rank")

USAGE = "python -m hf_adamp [--weight-norm] [--weight-norm-exclude REGEX] [--log-projection] SCRIPT.py [script args]"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_adamp",
        usage=USAGE,
        description="Run a training script unchanged, with optim='adamp'|'sgdp'|'radam' registered in "
        "transformers (--optim adamp) and, optionally, weight normalisation applied to the model that the "
        "Trainer or accelerator.prepare receives.",
        epilog=f"Environment variables (options win): {ENV_WEIGHT_NORM}=1, {ENV_WEIGHT_NORM_INCLUDE}=REGEX, "
        f"{ENV_WEIGHT_NORM_EXCLUDE}=REGEX, {ENV_WEIGHT_NORM_FAMILY}=NAME, {ENV_LOG_PROJECTION}=1.",
    )
    parser.add_argument(
        "--weight-norm",
        action="store_true",
        default=None,
        help="weight-normalise the attention and MLP projections of the model before its optimizer is built",
    )
    parser.add_argument(
        "--weight-norm-include",
        action="append",
        metavar="REGEX",
        help="module names to wrap instead of the model family's rule (repeatable)",
    )
    parser.add_argument(
        "--weight-norm-exclude", action="append", metavar="REGEX", help="module names to leave unwrapped (repeatable)"
    )
    parser.add_argument(
        "--weight-norm-family", metavar="NAME", help="the family rule to use (default: config.model_type)"
    )
    parser.add_argument(
        "--log-projection",
        action="store_true",
        default=None,
        help="add hf_adamp's projection metrics to every Trainer's logs (trainer_state.json, report_to)",
    )
    return parser


_TAKES_VALUE = {"--weight-norm-include", "--weight-norm-exclude", "--weight-norm-family"}


@dataclass(frozen=True)
class LaunchOptions:
    script: str
    script_args: list[str]
    weight_norm: bool = False
    weight_norm_include: tuple[str, ...] | None = None
    weight_norm_exclude: tuple[str, ...] | None = None
    weight_norm_family: str | None = None
    log_projection: bool = False


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(our options, [SCRIPT.py, *script args]): the script is the first argument that is not an option of ours
    or its value; ``--`` ends our options explicitly."""
    ours: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return ours, list(argv[i + 1 :])
        if not arg.startswith("-") or arg == "-":
            return ours, list(argv[i:])
        ours.append(arg)
        if arg in _TAKES_VALUE and i + 1 < len(argv):
            ours.append(argv[i + 1])
            i += 1
        i += 1
    return ours, []


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"hf_adamp: {name}={os.environ[name]!r} is not a boolean: use 1 or 0")


def _env_pattern(name: str) -> tuple[str, ...] | None:
    value = os.environ.get(name, "")
    return (value,) if value else None


def parse_args(argv: Sequence[str]) -> LaunchOptions:
    """Our options (and their environment variables), the script and its arguments."""
    ours, rest = _split(argv)
    passed_on = [a for a in ours if a.split("=", 1)[0] in _SCRIPT_OPTIONS]
    ours = [a for a in ours if a not in passed_on]
    parser = _parser()
    ns = parser.parse_args(ours)
    if not rest:
        parser.error("the training script is missing")
    script, script_args = rest[0], passed_on + rest[1:]
    if not os.path.isfile(script):
        parser.error(f"{script}: no such file (to run a module instead, use `python -m {script}` without hf_adamp)")
    include = tuple(ns.weight_norm_include) if ns.weight_norm_include else _env_pattern(ENV_WEIGHT_NORM_INCLUDE)
    exclude = tuple(ns.weight_norm_exclude) if ns.weight_norm_exclude else _env_pattern(ENV_WEIGHT_NORM_EXCLUDE)
    family = ns.weight_norm_family or os.environ.get(ENV_WEIGHT_NORM_FAMILY) or None
    weight_norm = ns.weight_norm if ns.weight_norm is not None else _env_flag(ENV_WEIGHT_NORM)
    if not weight_norm and (ns.weight_norm_include or ns.weight_norm_exclude or ns.weight_norm_family):
        parser.error("--weight-norm-include/-exclude/-family need --weight-norm")
    log_projection = ns.log_projection if ns.log_projection is not None else _env_flag(ENV_LOG_PROJECTION)
    return LaunchOptions(script, script_args, weight_norm, include, exclude, family, log_projection)


def run(options: LaunchOptions) -> None:
    """Switch hf-adamp on as ``options`` say, then run the script in this process as ``__main__``."""
    if options.weight_norm:
        launch_hooks.enable_weight_norm(
            include=options.weight_norm_include,
            exclude=options.weight_norm_exclude,
            family=options.weight_norm_family,
        )
    if options.log_projection:
        launch_hooks.enable_projection_logging()
    script = os.path.abspath(options.script)
    sys.argv = [options.script, *options.script_args]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT.py` would set it
    runpy.run_path(script, run_name="__main__")


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(sys.argv[1:] if argv is None else argv))
