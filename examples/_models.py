"""Model configs for the two experiments: the papers' sizes, and tiny ones that train on a laptop CPU.

Language model. Transformer-XL, the AdamP paper's WikiText-103 model, is no longer in transformers 5.
We use GPT-2 (``GPT2LMHeadModel``) at Transformer-XL base's sizes: 16 layers, d_model 410, 10 heads
(head size 41), d_inner 2100, ReLU, dropout 0.1, no attention dropout. GPT-2 rather than Llama because
Llama's rotary embeddings need an even head size (41 is odd) and its gated MLP has three matrices, not
Transformer-XL's two; GPT-2 keeps the layer shapes, and hf_adamp's weight norm covers GPT-2 (Conv1D).
What differs: absolute learned positions and a fixed 512-token window instead of relative positions with a
150-token recurrence memory, and a BPE vocabulary with a plain softmax instead of the 267k-word adaptive
softmax, so perplexities are per BPE token and not comparable with the paper's word-level numbers
(run_clm.py also reports a word-level perplexity from the same loss).

Translation. fairseq's ``transformer_iwslt_de_en`` through ``MarianMTModel``: 6 encoder + 6 decoder layers,
d_model 512, FFN 1024, 4 heads, ReLU, dropout 0.3, sinusoidal positions, post-norm, embeddings scaled by
sqrt(d_model), one joint BPE vocabulary shared by the encoder, decoder and output layer.
"""

from __future__ import annotations

MODEL_SIZES = ("tiny", "paper")


def clm_config(size: str, vocab_size: int, block_size: int, eos_id: int = 1, pad_id: int = 0):
    from transformers import GPT2Config

    dims = {
        "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_inner=256),
        "paper": dict(n_layer=16, n_embd=410, n_head=10, n_inner=2100),
    }[_check(size)]
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        activation_function="relu",
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **dims,
    )


def translation_config(size: str, vocab_size: int, max_positions: int, eos_id: int = 1, pad_id: int = 0):
    """Defaults for eos/pad are the ids of the tokenizer that _tokenizer.train_bpe builds."""
    from transformers import MarianConfig

    dims = {
        "tiny": dict(layers=2, d_model=64, ffn=128, heads=2, dropout=0.1),
        "paper": dict(layers=6, d_model=512, ffn=1024, heads=4, dropout=0.3),
    }[_check(size)]
    return MarianConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        encoder_layers=dims["layers"],
        decoder_layers=dims["layers"],
        d_model=dims["d_model"],
        encoder_ffn_dim=dims["ffn"],
        decoder_ffn_dim=dims["ffn"],
        encoder_attention_heads=dims["heads"],
        decoder_attention_heads=dims["heads"],
        dropout=dims["dropout"],
        attention_dropout=0.0,
        activation_dropout=0.0,
        activation_function="relu",
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        decoder_start_token_id=pad_id,
        eos_token_id=eos_id,
        forced_eos_token_id=eos_id,
    )


def _check(size: str) -> str:
    if size not in MODEL_SIZES:
        raise ValueError(f"--model_size must be one of {MODEL_SIZES}, got {size!r}")
    return size


def count_parameters(model_cls, config) -> int:
    """Trainable parameters of ``model_cls(config)`` built on the meta device: no memory, no initialisation.
    (Marian's sinusoidal position table is a frozen parameter: not counted.)"""
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
