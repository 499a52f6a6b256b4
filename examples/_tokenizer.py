"""A byte-level BPE tokenizer trained on the run's own training text, for runs with no pretrained tokenizer.

Byte-level BPE decodes back to the exact input text, so BLEU on decoded translations sees real words.
The tokenizer is saved in the output directory before training: a resumed run or a later evaluation
finds it there and reuses it, and every checkpoint carries a copy (Trainer saves its processing_class).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

logger = logging.getLogger("hf_adamp.examples")

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "source.spm",
)


def train_bpe(texts: Iterable[str], vocab_size: int, append_eos: bool):
    """Train byte-level BPE on ``texts``; returns a transformers fast tokenizer.

    ``append_eos``: every encoded sequence ends with </s> (translation); off for language modelling,
    where the script adds </s> between lines itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"tokenizer vocab_size must be at least 300 (256 bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if append_eos:
        eos_id = tok.token_to_id(EOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos_id)]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=EOS)
    logger.info("Trained a byte-level BPE tokenizer with %d tokens", len(fast))
    return fast


def load_or_train_tokenizer(
    tokenizer_name: str | None,
    model_name_or_path: str | None,
    run_dir: str,
    training_args,
    texts_for_training,
    vocab_size: int,
    append_eos: bool,
):
    """Pick the tokenizer: --tokenizer_name, else the pretrained model's, else the one saved in the run's
    output directory (resume), else train one on ``texts_for_training()`` (a callable: read only if needed)."""
    from _common import has_tokenizer
    from transformers import AutoTokenizer

    if tokenizer_name is not None:
        return AutoTokenizer.from_pretrained(tokenizer_name)
    if model_name_or_path is not None:  # a pretrained model needs its own vocabulary, never a fresh one
        try:
            if os.path.isdir(model_name_or_path) and not any(
                os.path.isfile(os.path.join(model_name_or_path, name)) for name in TOKENIZER_FILES
            ):  # transformers 5 would build an empty tokenizer from config.json alone
                raise OSError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in the directory")
            return AutoTokenizer.from_pretrained(model_name_or_path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"Could not load the tokenizer of {model_name_or_path} ({type(err).__name__}: {str(err)[:200]}). "
                "Pass --tokenizer_name with the tokenizer the model was trained with."
            ) from err
    # Every rank enters the block, and decides inside it: a rank that checked before it could find the tokenizer
    # rank 0 had just saved, skip the block's barrier, and leave the ranks one barrier apart (a hang).
    with training_args.main_process_first(desc="train the tokenizer"):
        if has_tokenizer(run_dir):  # a resumed run, or rank 0 trained it while this rank waited
            logger.info("Reusing the tokenizer saved in %s", run_dir)
            return AutoTokenizer.from_pretrained(run_dir)
        tokenizer = train_bpe(texts_for_training(), vocab_size, append_eos)
        if training_args.process_index == 0:
            tokenizer.save_pretrained(run_dir)
    return tokenizer
