"""A causal-LM training script in the style of transformers' examples, which knows nothing of hf_adamp.

HfArgumentParser over model, data and TrainingArguments dataclasses, a model built from ``--model_type`` and
``--config_overrides`` (or loaded from ``--model_name_or_path``), ``--tokenizer_name``, and the stock Trainer.
The launcher tests run it unchanged: ``python -m hf_adamp [...] stock_style_clm.py --optim adamp ...``.
"""

import logging
import sys
from dataclasses import dataclass, field

from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved model to start from."})
    model_type: str | None = field(default=None, metadata={"help": "Train from scratch: the config's model type."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config changes when training from scratch, e.g. n_layer=2,n_embd=32."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or folder."})


@dataclass
class DataTrainingArguments:
    train_file: str | None = field(default=None, metadata={"help": "A text file to train on."})
    block_size: int = field(default=16, metadata={"help": "Tokens per training example."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many examples."})


def blocks_of(token_ids: list[int], block_size: int) -> list[dict[str, list[int]]]:
    starts = range(0, len(token_ids) - block_size + 1, block_size)
    return [{"input_ids": token_ids[s : s + block_size], "labels": token_ids[s : s + block_size]} for s in starts]


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(sys.argv[1])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    else:
        config = CONFIG_MAPPING[model_args.model_type]()
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        model = AutoModelForCausalLM.from_config(config)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    with open(data_args.train_file, encoding="utf-8") as f:
        token_ids = tokenizer(f.read())["input_ids"]
    train_dataset = blocks_of(token_ids, data_args.block_size)[: data_args.max_train_samples]

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()


if __name__ == "__main__":
    main()
