"""Tiny models of every supported family for the weight-norm tests (no tests here)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as T

VOCAB, LAYERS = 40, 2
_SMALL = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Family:
    """A tiny model and the module names weight norm must wrap in it."""

    name: str
    model_cls: str
    config: T.PretrainedConfig
    expected: frozenset[str]
    encoder_decoder: bool = False

    def build(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return getattr(T, self.model_cls)(self.config).eval()

    def inputs(self, seed: int = 1, batch: int = 2, length: int = 6) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
        if self.encoder_decoder:
            return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB, (batch, 4), generator=gen)}
        return {"input_ids": ids}


def _names(blocks: list[str], projections: list[str]) -> frozenset[str]:
    return frozenset(f"{b}.{i}.{p}" for b in blocks for i in range(LAYERS) for p in projections)


_LLAMA_PROJ = [f"self_attn.{x}_proj" for x in "qkvo"] + [f"mlp.{x}_proj" for x in ("gate", "up", "down")]
_DEC = dict(
    num_hidden_layers=LAYERS,
    hidden_size=16,
    intermediate_size=24,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    **_SMALL,
)
_BERT_PROJ = [f"attention.self.{x}" for x in ("query", "key", "value")] + [
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
_BERT = dict(
    num_hidden_layers=LAYERS,
    hidden_size=16,
    intermediate_size=24,
    num_attention_heads=2,
    max_position_embeddings=40,
    **_SMALL,
)
_ATTN = [f"{x}_proj" for x in ("q", "k", "v", "out")]
_BART = dict(
    encoder_layers=LAYERS,
    decoder_layers=LAYERS,
    d_model=16,
    encoder_ffn_dim=24,
    decoder_ffn_dim=24,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    max_position_embeddings=32,
    decoder_start_token_id=2,
    **_SMALL,
)
_BART_EXPECTED = _names(["model.encoder.layers"], [f"self_attn.{x}" for x in _ATTN] + ["fc1", "fc2"]) | _names(
    ["model.decoder.layers"], [f"{a}.{x}" for a in ("self_attn", "encoder_attn") for x in _ATTN] + ["fc1", "fc2"]
)
_T5 = dict(
    num_layers=LAYERS,
    num_decoder_layers=LAYERS,
    d_model=16,
    d_kv=8,
    num_heads=2,
    d_ff=24,
    decoder_start_token_id=0,
    **_SMALL,
)


def _t5_expected(mlp: list[str]) -> frozenset[str]:
    enc = [f"layer.0.SelfAttention.{x}" for x in "qkvo"] + [f"layer.1.DenseReluDense.{x}" for x in mlp]
    dec = [f"layer.0.SelfAttention.{x}" for x in "qkvo"] + [f"layer.1.EncDecAttention.{x}" for x in "qkvo"]
    dec += [f"layer.2.DenseReluDense.{x}" for x in mlp]
    return _names(["encoder.block"], enc) | _names(["decoder.block"], dec)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "gpt2",
            "GPT2LMHeadModel",
            T.GPT2Config(n_layer=LAYERS, n_embd=16, n_head=2, n_positions=32, **_SMALL),
            _names(["transformer.h"], ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
        ),
        Family("llama", "LlamaForCausalLM", T.LlamaConfig(**_DEC), _names(["model.layers"], _LLAMA_PROJ)),
        Family("mistral", "MistralForCausalLM", T.MistralConfig(**_DEC), _names(["model.layers"], _LLAMA_PROJ)),
        Family("qwen2", "Qwen2ForCausalLM", T.Qwen2Config(**_DEC), _names(["model.layers"], _LLAMA_PROJ)),
        Family("bert", "BertForMaskedLM", T.BertConfig(**_BERT), _names(["bert.encoder.layer"], _BERT_PROJ)),
        Family(
            "roberta", "RobertaForMaskedLM", T.RobertaConfig(**_BERT), _names(["roberta.encoder.layer"], _BERT_PROJ)
        ),
        Family("t5", "T5ForConditionalGeneration", T.T5Config(**_T5), _t5_expected(["wi", "wo"]), True),
        Family(
            "t5-gated",
            "T5ForConditionalGeneration",
            T.T5Config(feed_forward_proj="gated-gelu", **_T5),
            _t5_expected(["wi_0", "wi_1", "wo"]),
            True,
        ),
        Family("bart", "BartForConditionalGeneration", T.BartConfig(**_BART), _BART_EXPECTED, True),
        Family("marian", "MarianMTModel", T.MarianConfig(**_BART), _BART_EXPECTED, True),
    ]
}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


_VANILLA = textwrap.dedent(
    """
    import sys, torch, transformers
    jobs = torch.load(sys.argv[1])
    out = {}
    for key, (cls, path, inputs) in jobs.items():
        model = getattr(transformers, cls).from_pretrained(path).eval()
        with torch.no_grad():
            out[key] = model(**inputs).logits
    assert not any(m.startswith("hf_adamp") for m in sys.modules), "hf_adamp was imported"
    torch.save(out, sys.argv[2])
    """
)


def vanilla_logits(jobs: dict[str, tuple[str, str, dict]], workdir: Path) -> dict[str, torch.Tensor]:
    """Load each (model class, checkpoint dir, inputs) with plain transformers in a fresh process without
    hf_adamp on its path, and return the logits."""
    job_file, out_file = workdir / "jobs.pt", workdir / "logits.pt"
    torch.save(jobs, job_file)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", _VANILLA, str(job_file), str(out_file)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out_file)
