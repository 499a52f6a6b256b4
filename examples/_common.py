"""Helpers shared by run_clm.py and run_translation.py: arguments, local files, hub datasets, checkpoints.

Kept free of model code so both scripts (and the tests) can import it cheaply.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("hf_adamp.examples")

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class DataUnavailableError(RuntimeError):
    """Neither local files nor the Hugging Face hub could provide the data."""


# ----- arguments: the command line, or one YAML/JSON file plus command-line overrides -----
def config_to_argv(config: dict[str, Any]) -> list[str]:
    """Turn a config mapping into command-line words, so that flags after it override its values."""
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, dict):  # e.g. an inline deepspeed config: TrainingArguments takes a JSON string
            value = json.dumps(value)
        if isinstance(value, list | tuple):
            if value:  # an empty list is the dataclass default anyway
                argv += [f"--{key}", *map(str, value)]
            continue
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(data).__name__}")
    return data


def expand_config_argv(argv: Sequence[str]) -> list[str]:
    """``[config.yaml, --max_steps, 2]`` -> the config's flags followed by the overrides (last one wins)."""
    argv = list(argv)
    if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        return config_to_argv(load_config_file(argv[0])) + argv[1:]
    return argv


def parse_arguments(parser, argv: Sequence[str] | None = None) -> tuple:
    """Parse dataclasses from the command line, or from a YAML/JSON file given first (overridable after it)."""
    argv = sys.argv[1:] if argv is None else argv
    return parser.parse_args_into_dataclasses(args=expand_config_argv(argv), look_for_args_file=False)


def setup_logging(training_args) -> None:
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.setLevel(level)
    import datasets
    import transformers

    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    if training_args.disable_tqdm:  # the same switch for datasets' map/filter progress bars
        datasets.disable_progress_bars()


# ----- local files -----
def open_text(path: str | os.PathLike):
    """Open plain or gzip text (by suffix) for reading."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_lines(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The first ``limit`` lines of a plain or gzip text file, without line ends (reads no further)."""
    lines: list[str] = []
    with open_text(path) as f:
        for line in f:
            if limit is not None and len(lines) >= limit:
                break
            lines.append(line.rstrip("\n"))
    return lines


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not a JSON object ({err})") from None
    return rows


def is_jsonl(path: str | os.PathLike) -> bool:
    name = str(path).removesuffix(".gz")
    return name.endswith((".jsonl", ".json"))


# ----- the hub -----
def load_hub_dataset(name: str, config_name: str | None, local_hint: str, revision: str | None = None, **kwargs):
    """``datasets.load_dataset`` with an error that says what to do when the hub cannot be reached.

    datasets >= 4 refuses repositories that still hold a loading script (bbaaaa/iwslt14-de-en does); the hub
    keeps a Parquet export of them on the "refs/convert/parquet" branch, which loads without the script."""
    import datasets

    try:
        try:
            return datasets.load_dataset(name, config_name, revision=revision, **kwargs)
        except RuntimeError as err:
            if "scripts are no longer supported" not in str(err) or revision is not None:
                raise
            logger.warning("%s has a loading script; loading its Parquet export (%s) instead", name, PARQUET_REVISION)
            return datasets.load_dataset(name, config_name, revision=PARQUET_REVISION, **kwargs)
    except Exception as err:  # ConnectionError, offline mode, gated or missing repo: all mean "no data"
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in _OFFLINE_VARS)
        why = "offline mode is on" if offline else "the hub could not be reached or has no such dataset"
        raise DataUnavailableError(
            f"Could not load dataset {name!r} (config {config_name!r}) from the Hugging Face hub: {why} "
            f"({type(err).__name__}: {str(err)[:300]}). Without the hub, give local files: {local_hint}."
        ) from err


PARQUET_REVISION = "refs/convert/parquet"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def take(dataset, limit: int | None):
    """The first ``limit`` rows of a datasets.Dataset (all when None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.select(range(limit))


def batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ----- the end of a run -----
def end_distributed() -> None:
    """Leave the process group before the interpreter exits: a gloo group torn down by exit handlers instead
    can abort a rank ("terminate called without an active exception") after its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----- checkpoints -----
def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint last`` (or ``true``) -> the newest checkpoint in output_dir; a path as is."""
    if resume_from_checkpoint is None or resume_from_checkpoint.lower() in ("", "false", "none"):
        return None
    if resume_from_checkpoint.lower() in ("last", "true"):
        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if found is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint}: no checkpoint in {output_dir}")
        return found
    if not os.path.isdir(resume_from_checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint: no such checkpoint directory {resume_from_checkpoint}")
    return resume_from_checkpoint


def has_tokenizer(directory: str | os.PathLike | None) -> bool:
    return directory is not None and (Path(directory) / "tokenizer.json").is_file()
