"""Translation (IWSLT'14 De-En, the RAdam paper's experiment) with Seq2SeqTrainer and hf_adamp.

    # paper-sized Transformer (fairseq transformer_iwslt_de_en shapes), IWSLT'14 from the hub, 8 GPUs:
    accelerate launch --config_file configs/accelerate/ddp.yaml examples/run_translation.py \
        configs/experiments/paper/translation_radam_nowarmup.yaml
    # a small CPU run on local parallel files (flags after a config file override it):
    python examples/run_translation.py configs/experiments/cpu/translation_radam_nowarmup.yaml \
        --output_dir runs/radam --train_source_file train.de.gz --train_target_file train.en.gz \
        --validation_source_file val.de.gz --validation_target_file val.en.gz

Local data, either line-aligned files (plain or .gz, one sentence a line):
``--{train,validation,test}_{source,target}_file``, or JSON lines (``--train_file x.jsonl``) with
``{"de": ..., "en": ...}`` or ``{"translation": {"de": ..., "en": ...}}`` per line. Local files take precedence
over ``--dataset_name``. Evaluation generates translations (``--predict_with_generate``) and reports
sacreBLEU on detokenized text (see _metrics.py for the offline route).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common & co. next to this file

from _common import (  # noqa: E402
    end_distributed,
    is_jsonl,
    load_hub_dataset,
    parse_arguments,
    read_jsonl,
    read_lines,
    resolve_checkpoint,
    setup_logging,
    take,
)
from _metrics import Bleu  # noqa: E402
from _models import MODEL_SIZES, translation_config  # noqa: E402
from _tokenizer import load_or_train_tokenizer  # noqa: E402

import hf_adamp  # noqa: E402  (registers --optim adamp|sgdp|radam)

logger = logging.getLogger("hf_adamp.examples")
SPLITS = ("train", "validation", "test")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained seq2seq model to fine-tune (hub id or local directory)."}
    )
    model_size: str = field(
        default="tiny", metadata={"help": "Size when training from scratch.", "choices": list(MODEL_SIZES)}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": 'Config changes when training from scratch, e.g. "encoder_layers=3".'}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Pretrained tokenizer (hub id or directory)."})
    tokenizer_vocab_size: int = field(
        default=10000, metadata={"help": "Size of the joint source+target BPE vocabulary trained when none is given."}
    )


@dataclass
class DataArguments:
    source_lang: str = field(default="de", metadata={"help": "Source language key."})
    target_lang: str = field(default="en", metadata={"help": "Target language key."})
    dataset_name: str | None = field(default="bbaaaa/iwslt14-de-en", metadata={"help": "Hub dataset id."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub dataset revision (branch, tag, commit)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    train_file: str | None = field(default=None, metadata={"help": "Local JSON lines (.jsonl[.gz])."})
    validation_file: str | None = field(default=None, metadata={"help": "Local JSON lines (.jsonl[.gz])."})
    test_file: str | None = field(default=None, metadata={"help": "Local JSON lines (.jsonl[.gz])."})
    train_source_file: str | None = field(default=None, metadata={"help": "Source sentences, one a line."})
    train_target_file: str | None = field(default=None, metadata={"help": "Target sentences, line-aligned."})
    validation_source_file: str | None = field(default=None)
    validation_target_file: str | None = field(default=None)
    test_source_file: str | None = field(default=None)
    test_target_file: str | None = field(default=None)
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation pairs."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test pairs."})
    max_source_length: int = field(default=128, metadata={"help": "Source tokens kept (longer are truncated)."})
    max_target_length: int = field(default=128, metadata={"help": "Target tokens kept (longer are truncated)."})
    bleu_metric: str = field(
        default="sacrebleu", metadata={"help": "evaluate metric name or local script path; falls back offline."}
    )

    def __post_init__(self):
        for split in SPLITS:
            src, tgt = getattr(self, f"{split}_source_file"), getattr(self, f"{split}_target_file")
            if (src is None) != (tgt is None):
                raise ValueError(f"Give both --{split}_source_file and --{split}_target_file, or neither.")
            if src is not None and getattr(self, f"{split}_file") is not None:
                raise ValueError(f"Give --{split}_file or --{split}_source_file/--{split}_target_file, not both.")
        if not self.has_local_files() and self.dataset_name is None:
            raise ValueError(
                "Give local files (--train_source_file/--train_target_file or --train_file) "
                "or --dataset_name (a hub dataset)."
            )
        if self.has_local_files() and not self.has_local("train"):
            raise ValueError("Local validation/test files need local training files too.")

    def has_local(self, split: str) -> bool:
        return getattr(self, f"{split}_file") is not None or getattr(self, f"{split}_source_file") is not None

    def has_local_files(self) -> bool:
        return any(self.has_local(split) for split in SPLITS)


def _pair(row: dict, src: str, tgt: str, where: str) -> tuple[str, str]:
    row = row.get("translation", row)
    if src not in row or tgt not in row:
        raise ValueError(f"{where}: expected keys {src!r} and {tgt!r} (or a 'translation' dict), got {sorted(row)}")
    return str(row[src]), str(row[tgt])


def load_pairs(data: DataArguments) -> dict[str, tuple[list[str], list[str]]]:
    """(sources, targets) per split from local files, else from the hub dataset."""
    limits = {"train": data.max_train_samples, "validation": data.max_eval_samples, "test": data.max_predict_samples}
    src, tgt = data.source_lang, data.target_lang
    out: dict[str, tuple[list[str], list[str]]] = {}
    if data.has_local_files():
        for split in SPLITS:
            jsonl, src_file = getattr(data, f"{split}_file"), getattr(data, f"{split}_source_file")
            if jsonl is not None:
                if not is_jsonl(jsonl):
                    raise ValueError(f"--{split}_file must be JSON lines (.jsonl or .jsonl.gz), got {jsonl}")
                pairs = [_pair(row, src, tgt, jsonl) for row in read_jsonl(jsonl, limits[split])]
                out[split] = ([s for s, _ in pairs], [t for _, t in pairs])
            elif src_file is not None:
                tgt_file = getattr(data, f"{split}_target_file")
                sources, targets = read_lines(src_file, limits[split]), read_lines(tgt_file, limits[split])
                if len(sources) != len(targets):
                    raise ValueError(f"{src_file} has {len(sources)} lines but {tgt_file} has {len(targets)}")
                out[split] = (sources, targets)
        return out
    hint = "--train_source_file X.de --train_target_file X.en (and --validation_*), or --train_file X.jsonl"
    raw = load_hub_dataset(data.dataset_name, data.dataset_config_name, hint, revision=data.dataset_revision)
    names = {"train": ["train"], "validation": ["validation", "valid", "dev"], "test": ["test"]}
    for split, candidates in names.items():
        found = next((raw[name] for name in candidates if name in raw), None)
        if found is not None:
            pairs = [_pair(row, src, tgt, data.dataset_name) for row in take(found, limits[split])]
            out[split] = ([s for s, _ in pairs], [t for _, t in pairs])
    return out


def encode(pairs: tuple[list[str], list[str]], tokenizer, data: DataArguments):
    from datasets import Dataset

    sources, targets = pairs
    enc = tokenizer(
        sources, text_target=targets, max_length=data.max_source_length, truncation=True, add_special_tokens=True
    )
    if data.max_target_length != data.max_source_length:
        enc["labels"] = tokenizer(text_target=targets, max_length=data.max_target_length, truncation=True)["input_ids"]
    return Dataset.from_dict(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["labels"]}
    )


def build_model(model_args: ModelArguments, tokenizer, data: DataArguments):
    from transformers import AutoModelForSeq2SeqLM, MarianMTModel

    if model_args.model_name_or_path is not None:
        model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        return model
    max_positions = max(data.max_source_length, data.max_target_length) + 2
    ids = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    config = translation_config(model_args.model_size, len(tokenizer), max_positions, **ids)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    return MarianMTModel(config)


def bleu_metrics(tokenizer, bleu: Bleu):
    import numpy as np

    def compute(eval_pred) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)  # -100 padding from the gather across ranks
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        hyps = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        refs = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        lengths = [np.count_nonzero(p != tokenizer.pad_token_id) for p in preds]
        return {"bleu": bleu(hyps, refs), "gen_len": float(np.mean(lengths))}

    return compute


def main(argv: list[str] | None = None) -> dict[str, float]:
    from transformers import (
        DataCollatorForSeq2Seq,
        HfArgumentParser,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        set_seed,
    )

    parser = HfArgumentParser((ModelArguments, DataArguments, Seq2SeqTrainingArguments, hf_adamp.WeightNormArguments))
    model_args, data_args, training_args, wn_args = parse_arguments(parser, argv)
    setup_logging(training_args)
    set_seed(training_args.seed)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    os.makedirs(training_args.output_dir, exist_ok=True)

    pairs = load_pairs(data_args)
    if "train" not in pairs:
        raise ValueError("No training split found.")
    tokenizer = load_or_train_tokenizer(
        model_args.tokenizer_name,
        model_args.model_name_or_path,
        training_args.output_dir,
        training_args,
        lambda: pairs["train"][0] + pairs["train"][1],  # one joint vocabulary for both languages
        model_args.tokenizer_vocab_size,
        append_eos=True,
    )
    datasets = {split: encode(p, tokenizer, data_args) for split, p in pairs.items()}
    wants_eval = training_args.do_eval or training_args.eval_strategy != "no"
    if wants_eval and "validation" not in datasets:
        raise ValueError("Evaluation was asked for but there is no validation split.")

    model = build_model(model_args, tokenizer, data_args)
    summary = wn_args.apply(model)
    if summary is not None:
        logger.info("Weight norm: %s", summary)
    gen = model.generation_config
    gen.max_length = training_args.generation_max_length or data_args.max_target_length
    gen.num_beams = training_args.generation_num_beams or gen.num_beams or 1
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Model: %s, %.2fM parameters, optimizer %s", type(model).__name__, n_params / 1e6, training_args.optim)

    compute_metrics = None
    if training_args.predict_with_generate:
        bleu = Bleu(data_args.bleu_metric)
        logger.info("BLEU route: %s", bleu.route)
        compute_metrics = bleu_metrics(tokenizer, bleu)
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("validation"),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=compute_metrics,
    )
    # weight norms, effective step sizes and projection counts in the logs (read on logging steps only)
    hf_adamp.add_projection_logging(trainer)
    metrics: dict[str, float] = {}
    if training_args.do_train or not (training_args.do_eval or training_args.do_predict):
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
    if wants_eval:
        eval_metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if training_args.do_predict:
        if "test" not in datasets:
            raise ValueError("--do_predict needs a test split (--test_source_file/--test_target_file or --test_file).")
        predict_metrics = trainer.predict(datasets["test"], metric_key_prefix="test").metrics
        trainer.log_metrics("test", predict_metrics)
        trainer.save_metrics("test", predict_metrics)
        metrics.update(predict_metrics)
    return metrics


if __name__ == "__main__":
    main()
    end_distributed()
