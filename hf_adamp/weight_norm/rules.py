"""Which modules of each model family get weight normalisation: one rule per family, in one place.

A rule names the ModuleLists that hold the Transformer blocks and, relative to one block, the linear
projections of attention (q/k/v/o, fused or not, self and cross) and of the MLP (up/gate/down/fc).
Embeddings, norms and the LM head are outside the blocks or are not linear layers, so they never match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FamilyRule:
    """Module-name rule for one family: ``<...>.<block_list>.<i>.<projection>`` (regular expressions)."""

    block_lists: str
    projections: str

    def pattern(self) -> re.Pattern[str]:
        return re.compile(rf"(?:.*\.)?(?:{self.block_lists})\.\d+\.(?:{self.projections})")

    def matches(self, module_name: str) -> bool:
        return self.pattern().fullmatch(module_name) is not None


_DECODER = FamilyRule(  # Llama, Mistral, Qwen2 and the decoders built like them
    block_lists="layers",
    projections=r"self_attn\.(?:q|k|v|o|qkv)_proj|mlp\.(?:gate|up|down|gate_up)_proj",
)
_BERT = FamilyRule(  # BERT and RoBERTa encoders (and their cross-attention when used as decoders)
    block_lists="layer",
    projections=r"(?:attention|crossattention)\.(?:self\.(?:query|key|value)|output\.dense)"
    r"|intermediate\.dense|output\.dense",
)
_BART = FamilyRule(  # BART and Marian encoder-decoders
    block_lists="layers",
    projections=r"(?:self_attn|encoder_attn)\.(?:q|k|v|out)_proj|fc1|fc2",
)

FAMILY_RULES: dict[str, FamilyRule] = {
    "gpt2": FamilyRule(
        block_lists="h",
        projections=r"(?:attn|crossattention)\.(?:c_attn|q_attn|c_proj)|mlp\.(?:c_fc|c_proj)",
    ),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "bert": _BERT,
    "roberta": _BERT,
    "t5": FamilyRule(
        block_lists="block",
        projections=r"layer\.\d+\.(?:SelfAttention|EncDecAttention)\.(?:q|k|v|o)"
        r"|layer\.\d+\.DenseReluDense\.(?:wi|wi_0|wi_1|wo)",
    ),
    "bart": _BART,
    "marian": _BART,
}


def model_family(model: nn.Module) -> str | None:
    """The ``config.model_type`` of a transformers model (or of the model it wraps), else None."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def rule_for(family: str) -> FamilyRule:
    try:
        return FAMILY_RULES[family]
    except KeyError:
        raise ValueError(
            f"No weight-norm rule for model family {family!r}; supported: {sorted(FAMILY_RULES)}. "
            "Pass family=<a supported family with the same module names> or include=[<module-name regex>]."
        ) from None
