"""examples/run_clm.py end to end on CPU: tiny GPT-2, local WikiText-2 lines, 2-4 steps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_experiments_common import (
    QUIET,
    clm_data_args,
    log_history,
    needs_wikitext,
    run_clm,
    run_script,
)

pytestmark = needs_wikitext


@pytest.mark.slow
def test_tiny_run_trains_evaluates_and_saves_plain_weights(tmp_path):
    out = tmp_path / "run"
    metrics = run_clm([
        "--output_dir", str(out), "--optim", "adamp", "--optim_args", "delta=0.1,nesterov=true",
        "--weight_norm", "true", "--do_train", "--do_eval", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--logging_steps", "1",
        *clm_data_args(), *QUIET,
    ])  # fmt: skip
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-6)
    assert metrics["word_perplexity"] > metrics["perplexity"] > 1  # BPE splits words: more tokens than words
    assert [e["step"] for e in log_history(out) if "loss" in e] == [1, 2]
    # the trained tokenizer is saved with the run; the exported model has plain (not weight-normed) weights
    assert (out / "tokenizer.json").is_file() and (out / "checkpoint-2" / "tokenizer.json").is_file()
    names = load_file(out / "model.safetensors").keys()
    assert "transformer.h.0.mlp.c_fc.weight" in names and not any("original" in n for n in names)
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["model_type"]) == (2, 64, "gpt2")


@pytest.mark.slow
@pytest.mark.parametrize("weight_norm", [False, True], ids=["plain", "weight_norm"])
def test_resume_gives_the_same_final_loss_as_one_run(tmp_path, weight_norm):
    """2 steps + checkpoint, resume to step 4 == 4 steps straight (AdamP state, data order, RNG restored).

    The resumed invocation gets another --seed: only a real resume (weights and RNG from the checkpoint)
    can then match; a run that silently started over would not. --data_seed keeps the batch order fixed."""
    common = [
        "--data_seed", "0", "--optim", "adamp", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
        "--weight_decay", "0.1", "--weight_norm", str(weight_norm).lower(),
        "--per_device_train_batch_size", "4", "--logging_steps", "1", *clm_data_args(eval_lines=0), *QUIET,
    ]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_clm(["--output_dir", str(straight), "--max_steps", "4", "--save_strategy", "no", *common])
    run_clm(["--output_dir", str(resumed), "--max_steps", "2", "--save_steps", "2", *common])
    assert (resumed / "checkpoint-2").is_dir()
    run_clm(["--output_dir", str(resumed), "--max_steps", "4", "--save_steps", "2",
             "--resume_from_checkpoint", "last", *common, "--seed", "1"])  # fmt: skip

    def losses(out):
        return {e["step"]: e["loss"] for e in log_history(out) if "loss" in e}

    assert losses(resumed)[4] == pytest.approx(losses(straight)[4], rel=1e-6)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
def test_finetune_local_pretrained_model_offline(tmp_path):
    """--model_name_or_path DIR loads the saved weights and tokenizer with the hub switched off."""
    import sys

    from test_experiments_common import EXAMPLES, WIKITEXT
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(EXAMPLES))
    from _common import read_lines
    from _tokenizer import train_bpe

    pretrained = tmp_path / "pretrained"
    tokenizer = train_bpe(read_lines(WIKITEXT / "train.txt", 200), 400, append_eos=False)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=32, vocab_size=len(tokenizer),
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)

    out = tmp_path / "finetuned"
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = ["--model_name_or_path", str(pretrained), "--output_dir", str(out), "--optim", "radam",
            "--learning_rate", "0", "--max_steps", "1", "--save_strategy", "no", "--per_device_train_batch_size", "2",
            *clm_data_args(train_lines=100, eval_lines=0), *QUIET]  # fmt: skip
    result = run_script("run_clm.py", argv, env=offline)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = load_file(pretrained / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # lr 0: still exactly the pretrained weights
    assert (out / "tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()


@pytest.mark.slow
def test_no_hub_and_no_files_is_a_clear_error(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = run_script("run_clm.py", ["--output_dir", str(tmp_path), *QUIET], env=offline)
    assert result.returncode != 0
    assert "DataUnavailableError: Could not load dataset 'Salesforce/wikitext'" in result.stderr
    assert "offline mode is on" in result.stderr and "--train_file" in result.stderr


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--validation_file needs --train_file"):
        run_clm(["--output_dir", str(tmp_path), "--validation_file", "v.txt", *QUIET])
    with pytest.raises(ValueError, match="fewer than one block of 4096"):
        run_clm(["--output_dir", str(tmp_path), *clm_data_args(train_lines=3), "--block_size", "4096", *QUIET])
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=300)).save_pretrained(tmp_path / "no_tok")
    with pytest.raises(ValueError, match="Could not load the tokenizer of .*no_tok.*--tokenizer_name"):
        run_clm(["--output_dir", str(tmp_path), "--model_name_or_path", str(tmp_path / "no_tok"),
                 *clm_data_args(train_lines=20, eval_lines=0), *QUIET])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="Data file not found"):
        run_clm(["--output_dir", str(tmp_path), "--train_file", str(tmp_path / "none.txt"), *QUIET])
