"""Shared pieces of the experiment tests (examples/run_clm.py, run_translation.py, configs/), and the helpers'
own unit tests: argument files with overrides, plain/gzip line reading, checkpoint resolution, BLEU offline.

The data are the offline copies in ``<repo>/../shared/data`` (read a few hundred lines at most, never copied
into the repository); tests that need them skip when that folder is absent.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = ROOT / "configs"
DATA = ROOT.parent / "shared" / "data"
WIKITEXT = DATA / "wikitext-2"
MULTI30K = DATA / "multi30k"

if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402
from _dist_helpers import run_ranks  # noqa: E402
from _metrics import Bleu  # noqa: E402

needs_wikitext = pytest.mark.skipif(
    not (WIKITEXT / "train.txt").is_file(), reason=f"offline WikiText-2 copy not found at {WIKITEXT}"
)
needs_multi30k = pytest.mark.skipif(
    not (MULTI30K / "train.de.gz").is_file(), reason=f"offline Multi30k copy not found at {MULTI30K}"
)

# Small everything: a 2-step run of a 2-layer, 64-wide model on a few hundred lines.
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "0"]


def clm_data_args(train_lines: int = 300, eval_lines: int = 60) -> list[str]:
    """Local WikiText-2 lines; no validation file when eval_lines is 0."""
    argv = ["--train_file", str(WIKITEXT / "train.txt"), "--max_train_samples", str(train_lines),
            "--tokenizer_vocab_size", "400", "--block_size", "32"]  # fmt: skip
    if eval_lines:
        argv += ["--validation_file", str(WIKITEXT / "valid.txt"), "--max_eval_samples", str(eval_lines)]
    return argv


def translation_data_args(train_pairs: int = 200, eval_pairs: int = 8) -> list[str]:
    return [
        "--train_source_file", str(MULTI30K / "train.de.gz"), "--train_target_file", str(MULTI30K / "train.en.gz"),
        "--validation_source_file", str(MULTI30K / "val.de.gz"),
        "--validation_target_file", str(MULTI30K / "val.en.gz"),
        "--max_train_samples", str(train_pairs), "--max_eval_samples", str(eval_pairs),
        "--tokenizer_vocab_size", "400", "--max_source_length", "32", "--max_target_length", "32",
        "--generation_max_length", "8", "--generation_num_beams", "1",
    ]  # fmt: skip


def run_clm(argv: list[str]) -> dict[str, float]:
    import run_clm

    return run_clm.main(argv)


def run_translation(argv: list[str]) -> dict[str, float]:
    import run_translation

    return run_translation.main(argv)


def run_script(script: str, argv: list[str], env: dict[str, str] | None = None, timeout: int = 300):
    """The script in a fresh interpreter (for environment variables read at import, like HF_HUB_OFFLINE)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, str(EXAMPLES / script), *argv]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- the helpers themselves -----
def test_config_file_then_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim: adamp\nmax_steps: 10\nweight_norm: true\nreport_to: []\nlabel_names: [labels]\n")
    argv = _common.expand_config_argv([str(cfg), "--max_steps", "2"])
    assert argv == ["--optim", "adamp", "--max_steps", "10", "--weight_norm", "true", "--label_names", "labels",
                    "--max_steps", "2"]  # fmt: skip
    from transformers import HfArgumentParser, TrainingArguments

    import hf_adamp

    parser = HfArgumentParser((TrainingArguments, hf_adamp.WeightNormArguments))
    args, wn = _common.parse_arguments(parser, [str(cfg), "--output_dir", str(tmp_path), "--max_steps", "2"])
    assert (args.optim, args.max_steps, wn.weight_norm) == ("adamp", 2, True)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Config file not found"):
        _common.expand_config_argv([str(tmp_path / "missing.yaml")])
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a mapping"):
        _common.expand_config_argv([str(bad)])


def test_read_lines_plain_and_gzip_stop_at_limit(tmp_path):
    lines = [f"line {i}" for i in range(50)]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    assert _common.read_lines(tmp_path / "a.txt", 5) == lines[:5]
    assert _common.read_lines(tmp_path / "a.txt.gz") == lines
    with pytest.raises(FileNotFoundError, match="Data file not found"):
        _common.read_lines(tmp_path / "nope.txt")


def test_resolve_checkpoint(tmp_path):
    assert _common.resolve_checkpoint(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        _common.resolve_checkpoint("last", str(tmp_path))
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert _common.resolve_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert _common.resolve_checkpoint(str(tmp_path / "checkpoint-2"), "x") == str(tmp_path / "checkpoint-2")


def test_bleu_offline_route_gives_sacrebleus_number(monkeypatch, tmp_path):
    """evaluate.load cannot fetch the script here; the fallback must give exactly sacrebleu's corpus BLEU."""
    import sacrebleu

    monkeypatch.chdir(tmp_path)  # evaluate.load looks for ./sacrebleu/sacrebleu.py first
    # case and punctuation matter to sacreBLEU's defaults (case-sensitive, 13a tokenisation)
    hyps = ["The cat sat on the mat.", "A dog runs in the park!", "two men are playing Guitar"]
    refs = ["the cat sat on a mat.", "A dog is running in the park.", "Two men play the guitar."]
    bleu = Bleu("sacrebleu")
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    if bleu.route != "sacrebleu.corpus_bleu":
        pytest.skip("evaluate's sacrebleu metric is reachable here; the fallback route is not exercised")
    assert bleu(hyps, refs) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 100
    assert bleu(refs, refs) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        bleu(hyps[:2], refs)


def test_script_datasets_fall_back_to_the_parquet_export(monkeypatch):
    """bbaaaa/iwslt14-de-en still has a loading script, which datasets >= 4 refuses; the hub's Parquet export
    loads instead. The hub is unreachable here, so load_dataset is replaced by a recorder (the only stand-in
    in these tests) that raises datasets' own error for the main revision."""
    import datasets

    calls = []

    def load_dataset(name, config_name=None, revision=None, **kwargs):
        calls.append(revision)
        if revision in (None, "main"):
            raise RuntimeError("Dataset scripts are no longer supported, but found iwslt14-de-en.py")
        return {"train": []}

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert _common.load_hub_dataset("bbaaaa/iwslt14-de-en", None, "local files") == {"train": []}
    assert calls == [None, "refs/convert/parquet"]
    calls.clear()
    with pytest.raises(_common.DataUnavailableError, match="scripts are no longer supported.*local files"):
        _common.load_hub_dataset("x/y", None, "local files", revision="main")  # an explicit revision: no retry
    assert calls == ["main"]


def _tokenizer_on_a_late_rank(rank, world, run_dir):
    """Rank 1 starts only once rank 0 has saved the tokenizer it trained (the late rank of a real launch)."""
    import time

    import torch
    from _tokenizer import load_or_train_tokenizer
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=run_dir, use_cpu=True, report_to=[])
    assert args.world_size == world and torch.distributed.is_initialized()
    if rank == 1:
        deadline = time.monotonic() + 60
        while not _common.has_tokenizer(run_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
    texts = [f"line {i} of a small corpus with some words, {i * 7} and {i % 13}" for i in range(200)]
    tok = load_or_train_tokenizer(None, None, run_dir, args, lambda: texts, vocab_size=300, append_eos=False)
    # a rank that skipped one of the block's barriers is one collective behind: this one would pair with it
    # and the other rank would wait here until the timeout
    torch.distributed.barrier()
    return len(tok)


def test_tokenizer_training_keeps_a_late_rank_in_step(tmp_path):
    """A rank that arrives after rank 0 saved the tokenizer still takes part in every barrier of the block."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sizes = run_ranks(_tokenizer_on_a_late_rank, 2, tmp_path, str(run_dir), timeout=90)
    assert sizes[0] == sizes[1] and _common.has_tokenizer(run_dir)
