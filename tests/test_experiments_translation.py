"""examples/run_translation.py end to end on CPU: tiny Marian, local Multi30k pairs, 2 steps, BLEU by generation."""

from __future__ import annotations

import gzip
import json

import pytest
from test_experiments_common import (
    MULTI30K,
    QUIET,
    log_history,
    needs_multi30k,
    run_script,
    run_translation,
    translation_data_args,
)

pytestmark = needs_multi30k


@pytest.mark.slow
def test_tiny_run_with_generation_and_bleu(tmp_path):
    out = tmp_path / "run"
    metrics = run_translation([
        "--output_dir", str(out), "--optim", "radam", "--do_train", "--do_eval", "--predict_with_generate", "true",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--logging_steps", "1", *translation_data_args(), *QUIET,
    ])  # fmt: skip
    assert 0.0 <= metrics["eval_bleu"] <= 100.0 and 1 <= metrics["eval_gen_len"] <= 8
    assert metrics["eval_loss"] > 0
    assert [e["step"] for e in log_history(out) if "loss" in e] == [1, 2]
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["encoder_layers"], config["d_model"]) == ("marian", 2, 64)
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    assert tokenizer["post_processor"]["type"] == "TemplateProcessing"  # every sequence ends with </s>


@pytest.mark.slow
def test_jsonl_input_and_test_split(tmp_path):
    """--train_file/--validation_file/--test_file as JSON lines, both row shapes, and --do_predict."""
    from _common import read_lines

    de, en = read_lines(MULTI30K / "train.de.gz", 120), read_lines(MULTI30K / "train.en.gz", 120)
    pairs = enumerate(zip(de, en))
    rows = [{"de": d, "en": e} if i % 2 else {"translation": {"de": d, "en": e}} for i, (d, e) in pairs]
    train = tmp_path / "train.jsonl.gz"
    with gzip.open(train, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:100])
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(json.dumps(r) + "\n" for r in rows[100:]))
    out = tmp_path / "run"
    metrics = run_translation([
        "--output_dir", str(out), "--train_file", str(train), "--validation_file", str(valid),
        "--test_file", str(valid), "--max_predict_samples", "4", "--do_train", "--do_predict",
        "--predict_with_generate", "true", "--max_steps", "1", "--per_device_train_batch_size", "8",
        "--tokenizer_vocab_size", "400", "--generation_max_length", "6", "--save_strategy", "no", *QUIET,
    ])  # fmt: skip
    assert "test_bleu" in metrics and (out / "test_results.json").is_file()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"source": "x", "target": "y"}) + "\n")
    with pytest.raises(ValueError, match="expected keys 'de' and 'en'"):
        run_translation(["--output_dir", str(tmp_path / "bad"), "--train_file", str(bad), *QUIET])


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Give both --train_source_file and --train_target_file"):
        run_translation(["--output_dir", str(tmp_path), "--train_source_file", "a.de", *QUIET])
    with pytest.raises(ValueError, match="must be JSON lines"):
        run_translation(["--output_dir", str(tmp_path), "--train_file", str(MULTI30K / "train.de.gz"), *QUIET])
    src = tmp_path / "src.txt"
    src.write_text("a\nb\nc\n")
    tgt = tmp_path / "tgt.txt"
    tgt.write_text("a\nb\n")
    with pytest.raises(ValueError, match="has 3 lines but .* has 2"):
        run_translation(["--output_dir", str(tmp_path), "--train_source_file", str(src),
                         "--train_target_file", str(tgt), *QUIET])  # fmt: skip


@pytest.mark.slow
def test_no_hub_and_no_files_is_a_clear_error(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = run_script("run_translation.py", ["--output_dir", str(tmp_path), *QUIET], env=offline)
    assert result.returncode != 0
    assert "DataUnavailableError: Could not load dataset 'bbaaaa/iwslt14-de-en'" in result.stderr
    assert "--train_source_file" in result.stderr
