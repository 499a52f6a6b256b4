"""Causal language modelling (WikiText-103, the AdamP paper's LM experiment) with the Trainer and hf_adamp.

    # from scratch, paper-sized GPT-2 (Transformer-XL base shapes), WikiText-103 from the hub:
    accelerate launch --config_file configs/accelerate/ddp.yaml examples/run_clm.py \
        configs/experiments/paper/clm_adamp.yaml
    # a 2-minute CPU run on local text files (flags after a config file override it):
    python examples/run_clm.py configs/experiments/cpu/clm_adamp.yaml --output_dir runs/clm_adamp \
        --train_file wikitext-2/train.txt --validation_file wikitext-2/valid.txt
    # fine-tune a saved model (works offline):
    python examples/run_clm.py --model_name_or_path ./my-gpt2 --train_file ... --optim adamp --output_dir ...

Local files (``--train_file``/``--validation_file``, plain or .gz text, one line a sample) take
precedence over ``--dataset_name``. Each non-empty line is tokenized and followed by </s>; the stream is cut
into ``block_size`` blocks. Metrics: ``eval_loss``, ``perplexity`` (per token) and ``word_perplexity``
(the same loss spread over the evaluation text's whitespace words instead of its tokens).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common & co. next to this file

from _common import (  # noqa: E402
    end_distributed,
    load_hub_dataset,
    parse_arguments,
    read_lines,
    resolve_checkpoint,
    setup_logging,
    take,
)
from _models import MODEL_SIZES, clm_config  # noqa: E402
from _tokenizer import load_or_train_tokenizer  # noqa: E402

import hf_adamp  # noqa: E402  (registers --optim adamp|sgdp|radam)

logger = logging.getLogger("hf_adamp.examples")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained model to fine-tune (hub id or local directory); else from scratch."}
    )
    model_size: str = field(
        default="tiny", metadata={"help": "Size when training from scratch.", "choices": list(MODEL_SIZES)}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": 'Config changes when training from scratch, e.g. "n_layer=4,n_embd=128".'}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Pretrained tokenizer (hub id or directory)."})
    tokenizer_vocab_size: int = field(
        default=32000, metadata={"help": "Vocabulary size of the BPE tokenizer trained when none is given."}
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(default="Salesforce/wikitext", metadata={"help": "Hub dataset id."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub dataset revision (branch, tag, commit)."})
    dataset_config_name: str | None = field(default="wikitext-103-raw-v1", metadata={"help": "Hub dataset config."})
    train_file: str | None = field(default=None, metadata={"help": "Local training text (.txt or .txt.gz)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation text (.txt or .txt.gz)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training lines."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation lines."})
    block_size: int = field(default=512, metadata={"help": "Tokens per training/evaluation sequence."})

    def __post_init__(self):
        if self.train_file is None and self.dataset_name is None:
            raise ValueError("Give --train_file (local text) or --dataset_name (a hub dataset).")
        if self.validation_file is not None and self.train_file is None:
            raise ValueError("--validation_file needs --train_file too (local files replace the hub dataset).")
        if self.block_size < 2:
            raise ValueError(f"--block_size must be at least 2, got {self.block_size}")


def load_texts(data: DataArguments) -> dict:
    """A datasets.Dataset with a "text" column per split: local files when given, else the hub dataset."""
    from datasets import Dataset

    if data.train_file is not None:
        splits = {"train": Dataset.from_dict({"text": read_lines(data.train_file, data.max_train_samples)})}
        if data.validation_file is not None:
            splits["validation"] = Dataset.from_dict({"text": read_lines(data.validation_file, data.max_eval_samples)})
        return splits
    hint = "--train_file X.txt --validation_file Y.txt"
    raw = load_hub_dataset(data.dataset_name, data.dataset_config_name, hint, revision=data.dataset_revision)
    splits = {"train": take(raw["train"], data.max_train_samples)}
    if "validation" in raw:
        splits["validation"] = take(raw["validation"], data.max_eval_samples)
    return splits


def non_empty_lines(texts):
    """Stripped, non-empty lines (WikiText has blank lines between paragraphs)."""
    texts = texts.map(lambda b: {"text": [t.strip() for t in b["text"]]}, batched=True, desc="strip")
    return texts.filter(lambda b: [bool(t) for t in b["text"]], batched=True, desc="drop empty lines")


def to_blocks(texts, tokenizer, block_size: int):
    """Tokenize each line + </s>, concatenate, cut into full blocks; labels = input_ids (the model shifts).

    datasets.map keeps this out of Python lists (WikiText-103 is ~100M tokens) and caches it on disk for
    hub datasets, so the other ranks of a multi-GPU run reuse rank 0's work (see main_process_first)."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids], "n_words": [len(t.split()) + 1 for t in batch["text"]]}

    def group(batch):
        stream = [token for ids in batch["input_ids"] for token in ids]
        cut = len(stream) // block_size * block_size
        blocks = [stream[i : i + block_size] for i in range(0, cut, block_size)]
        return {"input_ids": blocks, "labels": blocks}

    tokens = texts.map(tokenize, batched=True, remove_columns=texts.column_names, desc="tokenize")
    n_tokens, n_words = sum(len(x) for x in tokens["input_ids"]), sum(tokens["n_words"])
    blocks = tokens.map(group, batched=True, batch_size=1000, remove_columns=tokens.column_names, desc="blocks")
    if len(blocks) == 0:
        raise ValueError(f"The text has {n_tokens} tokens, fewer than one block of {block_size}: lower --block_size")
    return blocks, n_tokens / max(1, n_words)


def build_model(model_args: ModelArguments, tokenizer, block_size: int):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    if model_args.model_name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        return model
    ids = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    config = clm_config(model_args.model_size, len(tokenizer), block_size, **ids)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    return GPT2LMHeadModel(config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    from transformers import HfArgumentParser, Trainer, TrainingArguments, default_data_collator, set_seed

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, hf_adamp.WeightNormArguments))
    model_args, data_args, training_args, wn_args = parse_arguments(parser, argv)
    setup_logging(training_args)
    set_seed(training_args.seed)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    os.makedirs(training_args.output_dir, exist_ok=True)

    texts = {split: non_empty_lines(t) for split, t in load_texts(data_args).items()}
    tokenizer = load_or_train_tokenizer(
        model_args.tokenizer_name,
        model_args.model_name_or_path,
        training_args.output_dir,
        training_args,
        lambda: (batch["text"] for batch in texts["train"].iter(batch_size=1000)),
        model_args.tokenizer_vocab_size,
        append_eos=False,
    )
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; it is needed to separate lines.")
    block_size = data_args.block_size
    with training_args.main_process_first(desc="tokenize and group"):
        train_set, _ = to_blocks(texts["train"], tokenizer, block_size)
        eval_set, tokens_per_word = None, 1.0
        if "validation" in texts:
            eval_set, tokens_per_word = to_blocks(texts["validation"], tokenizer, block_size)
    if eval_set is None and (training_args.do_eval or training_args.eval_strategy != "no"):
        raise ValueError("Evaluation was asked for but there is no validation split: give --validation_file.")

    model = build_model(model_args, tokenizer, block_size)
    summary = wn_args.apply(model)
    if summary is not None:
        logger.info("Weight norm: %s", summary)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Model: %s, %.2fM parameters, optimizer %s", type(model).__name__, n_params / 1e6, training_args.optim)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    # weight norms, effective step sizes and projection counts in the logs (read on logging steps only)
    hf_adamp.add_projection_logging(trainer)
    metrics: dict[str, float] = {}
    if training_args.do_train or not training_args.do_eval:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if eval_set is not None and (training_args.do_eval or training_args.eval_strategy != "no"):
        eval_metrics = trainer.evaluate()
        loss = eval_metrics["eval_loss"]
        eval_metrics["perplexity"] = _safe_exp(loss)
        # The same log-likelihood spread over words instead of tokens, comparable across tokenizers.
        eval_metrics["word_perplexity"] = _safe_exp(loss * tokens_per_word)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


if __name__ == "__main__":
    main()
    end_distributed()
