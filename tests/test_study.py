"""results/study.py: a run writes its JSON (command, commit, metrics, curves), a second call skips it, and the
report is built from what is there. Tiny corpora made here, two-step runs of tiny models."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat ran on under mat log red blue big small house tree".split()
TINY = [
    "max_steps=2",
    "eval_steps=2",
    "logging_steps=1",
    "tokenizer_vocab_size=300",
    "per_device_eval_batch_size=8",
]


def sentences(n: int, seed: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * seed) % len(WORDS)] for j in range(6 + i % 5)) for i in range(n)]


@pytest.fixture
def corpora(tmp_path):
    lm, mt = tmp_path / "lm", tmp_path / "mt"
    lm.mkdir()
    mt.mkdir()
    (lm / "train.txt").write_text("\n".join(sentences(200, 3)) + "\n")
    (lm / "valid.txt").write_text("\n".join(sentences(40, 5)) + "\n")
    for prefix, n in (("train", 120), ("val", 20)):
        for lang, seed in (("de", 3), ("en", 5)):
            with gzip.open(mt / f"{prefix}.{lang}.gz", "wt") as f:
                f.write("\n".join(sentences(n, seed)) + "\n")
    return lm, mt


def study(*args: str, runs: Path, corpora) -> subprocess.CompletedProcess:
    lm, mt = corpora
    cmd = [sys.executable, "results/study.py", "--runs-dir", str(runs), "--data", str(lm), "--mt-data", str(mt), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_a_run_writes_its_json_and_a_second_call_skips_it(tmp_path, corpora):
    runs = tmp_path / "runs"
    lm_set = ["--set", *TINY, "block_size=16", "config_overrides=n_layer=1,n_embd=32,n_head=2,n_inner=64"]
    mt_set = [
        "--set",
        *TINY,
        "config_overrides=encoder_layers=1,decoder_layers=1,d_model=32,encoder_ffn_dim=64,"
        "decoder_ffn_dim=64,encoder_attention_heads=2,decoder_attention_heads=2",
    ]
    for only, sets in (("lm/adamp/lr0.002_s0", lm_set), ("mt/adam_warmup/lr0.001_s0", mt_set)):
        done = study("--only", only, *sets, runs=runs, corpora=corpora)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    lm_json = runs / "lm" / "adamp" / "lr0.002_s0.json"
    mt_json = runs / "mt" / "adam_warmup" / "lr0.001_s0.json"
    lm_result, mt_result = json.loads(lm_json.read_text()), json.loads(mt_json.read_text())
    assert lm_result["seed"] == 0 and lm_result["lr"] == 0.002 and len(lm_result["commit"]) == 40
    assert "examples/run_clm.py configs/experiments/cpu/clm_adamp.yaml" in lm_result["command"]
    assert "--output_dir" not in lm_result["command"]  # a scratch folder, not part of the recipe
    assert lm_result["metrics"]["perplexity"] > 1
    assert [step for step, _ in lm_result["curves"]["loss"]] == [1, 2]
    assert "projection/none" in lm_result["curves"]  # AdamP's telemetry
    assert "--warmup_steps 150" in mt_result["command"] and "eval_bleu" in mt_result["metrics"]

    before = lm_json.stat().st_mtime_ns
    again = study("--only", "lm/adamp/lr0.002_s0", *lm_set, runs=runs, corpora=corpora)
    assert again.returncode == 0 and "start" not in again.stdout  # nothing to run
    assert lm_json.stat().st_mtime_ns == before

    listed = study("--list", runs=runs, corpora=corpora).stdout.splitlines()
    assert "done  lm/adamp/lr0.002_s0" in listed and "todo  lm/adamw/lr0.002_s0" in listed
    assert "todo  lm/sweep/adamw_wn/lr0.001_s0" in listed  # the seeded WN runs wait for the sweep

    report = (runs / "README.md").read_text()
    assert "| AdamP | 0.002 | 1 |" in report and "| Adam, warmup | 150 | 1 |" in report
    assert (runs / "lm_loss.png").is_file() and (runs / "mt_eval_bleu.png").is_file()
