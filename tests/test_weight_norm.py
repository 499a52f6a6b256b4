"""apply_weight_norm / remove_weight_norm on every supported family, export, and AdamP's view of v."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from test_weight_norm_helpers import FAMILIES, Family, logits, vanilla_logits
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

import hf_adamp
from hf_adamp.weight_norm import is_weight_normed, weight_normed_modules

NAMES = list(FAMILIES)


def _wrapped_names(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in weight_normed_modules(model)}


def _loss(family: Family, model: torch.nn.Module, seed: int) -> torch.Tensor:
    return model(**family.inputs(seed=seed)).logits.float().pow(2).mean()


@pytest.mark.parametrize("name", NAMES)
def test_wraps_expected_modules_and_keeps_logits(name: str) -> None:
    family = FAMILIES[name]
    model, inputs = family.build(), family.inputs()
    before = logits(model, inputs)
    summary = hf_adamp.apply_weight_norm(model)
    assert set(summary.wrapped) == family.expected
    assert _wrapped_names(model) == family.expected  # nothing else carries a parametrization
    assert not any(parametrize.is_parametrized(m) for n, m in model.named_modules() if n not in family.expected)
    torch.testing.assert_close(logits(model, inputs), before)
    gains = hf_adamp.weight_norm_gain_names(model)
    assert gains == {f"{n}.parametrizations.weight.original0" for n in family.expected}
    assert gains <= dict(model.named_parameters()).keys()


@pytest.mark.parametrize("name", NAMES)
def test_remove_weight_norm_restores_plain_model(name: str) -> None:
    family = FAMILIES[name]
    model, inputs = family.build(), family.inputs()
    plain_keys = set(model.state_dict())
    hf_adamp.apply_weight_norm(model)
    with torch.no_grad():  # move away from the initial point so the fold is not trivially the old weight
        for _, module in weight_normed_modules(model):
            module.parametrizations.weight.original0.mul_(1.5)
    wrapped = logits(model, inputs)
    assert sorted(hf_adamp.remove_weight_norm(model)) == sorted(family.expected)
    assert set(model.state_dict()) == plain_keys
    assert "save_pretrained" not in vars(model)
    torch.testing.assert_close(logits(model, inputs), wrapped)
    fresh = family.build(seed=1)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(fresh, inputs), wrapped)


def test_save_pretrained_loads_in_vanilla_transformers(tmp_path) -> None:
    """save_pretrained of every wrapped family writes plain weights; a process without hf_adamp loads them."""
    jobs, expected = {}, {}
    for name, family in FAMILIES.items():
        model = family.build()
        hf_adamp.apply_weight_norm(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)  # train a little so g, v differ from the init
        for seed in range(2):
            opt.zero_grad()
            _loss(family, model, seed).backward()
            opt.step()
        model.save_pretrained(tmp_path / name)
        inputs = family.inputs()
        jobs[name] = (family.model_cls, str(tmp_path / name), inputs)
        expected[name] = logits(model, inputs)
    loaded = vanilla_logits(jobs, tmp_path)
    for name in FAMILIES:
        torch.testing.assert_close(loaded[name], expected[name], msg=name)


@pytest.mark.parametrize("name", NAMES)
def test_adamp_projects_wrapped_weights_channelwise(name: str) -> None:
    family = FAMILIES[name]
    model = family.build()
    hf_adamp.apply_weight_norm(model)
    directions = {m.parametrizations.weight.original1 for _, m in weight_normed_modules(model)}
    opt = hf_adamp.AdamP(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for seed in range(3):
        opt.zero_grad()
        _loss(family, model, seed).backward()
        opt.step()
        decisions = opt.projection_decisions()
        assert {decisions[v] for v in directions} == {"channel"}


@pytest.mark.parametrize(("layout", "decision"), [("out_in", "channel"), ("in_out", "layer")])
def test_conv1d_layout_decides_adamp_view(layout: str, decision: str) -> None:
    """GPT-2 Conv1D: v stored [out, in] lines up with AdamP's rows (channel view); torch's [in, out] does not."""
    family = FAMILIES["gpt2"]
    model, inputs = family.build(), family.inputs()
    before = logits(model, inputs)
    hf_adamp.apply_weight_norm(model, conv1d_layout=layout)
    torch.testing.assert_close(logits(model, inputs), before)
    c_fc = model.transformer.h[0].mlp.c_fc  # weight [16, 64] = [in, out]
    v, g = c_fc.parametrizations.weight.original1, c_fc.parametrizations.weight.original0
    assert tuple(v.shape) == ((64, 16) if layout == "out_in" else (16, 64))
    assert g.numel() == 64  # one gain per output unit either way
    assert tuple(c_fc.weight.shape) == (16, 64)
    directions = {m.parametrizations.weight.original1 for _, m in weight_normed_modules(model)}
    opt = hf_adamp.AdamP(model.parameters(), lr=1e-2)
    for seed in range(2):
        opt.zero_grad()
        _loss(family, model, seed).backward()
        opt.step()
        decisions = opt.projection_decisions()
        assert {decisions[v] for v in directions} == {decision}
    # Scale invariance per output unit: scaling v's unit-rows changes nothing.
    with torch.no_grad():
        out = logits(model, inputs)
        scale = torch.rand(64) + 0.5
        v.mul_(scale[:, None] if layout == "out_in" else scale[None, :])
    torch.testing.assert_close(logits(model, inputs), out)


def test_include_exclude_patterns() -> None:
    family = FAMILIES["llama"]
    model = family.build()
    summary = hf_adamp.apply_weight_norm(model, exclude=[r"\.mlp\."])
    assert set(summary.wrapped) == {n for n in family.expected if ".mlp." not in n}
    assert set(summary.skipped) == {n for n in family.expected if ".mlp." in n}
    assert all(reason == "excluded by pattern" for reason in summary.skipped.values())

    model = family.build()
    summary = hf_adamp.apply_weight_norm(model, include=r"layers\.0\.self_attn\.[qk]_proj")
    assert set(summary.wrapped) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}
    assert "weight norm" in str(summary)


def test_lm_head_and_tied_weights_are_never_wrapped() -> None:
    model = FAMILIES["llama"].build()  # untied lm_head
    summary = hf_adamp.apply_weight_norm(model, include=["proj", "lm_head"])
    assert summary.skipped == {"lm_head": "LM head"}
    assert not is_weight_normed(model.lm_head)

    model = FAMILIES["bert"].build()  # decoder tied to the word embeddings; transform.dense is a free Linear
    summary = hf_adamp.apply_weight_norm(model, include=[r"^cls\."])
    assert summary.skipped == {"cls.predictions.decoder": "LM head"}
    assert set(summary.wrapped) == {"cls.predictions.transform.dense"}

    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    summary = hf_adamp.apply_weight_norm(tied, include=".*")
    assert summary.skipped == {"0": "tied weight", "1": "tied weight"}
    assert set(summary.wrapped) == {"2"}


def test_bad_input_gives_clear_errors() -> None:
    model = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match="conv1d_layout"):
        hf_adamp.apply_weight_norm(model, conv1d_layout="rows")
    with pytest.raises(ValueError, match="No weight-norm rule for model family 'nope'"):
        hf_adamp.apply_weight_norm(model, family="nope")
    with pytest.raises(ValueError, match="Invalid module-name pattern"):
        hf_adamp.apply_weight_norm(model, include="(")
    with pytest.raises(ValueError, match="found nothing to wrap"):
        hf_adamp.apply_weight_norm(model, include="no_such_module")
    with pytest.raises(ValueError, match="no config.model_type"):
        hf_adamp.apply_weight_norm(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no weight-normalised module"):
        hf_adamp.remove_weight_norm(model)
    hf_adamp.apply_weight_norm(model)
    with pytest.raises(ValueError, match="found nothing to wrap"):  # a second call finds everything wrapped
        hf_adamp.apply_weight_norm(model)


def test_wrapped_model_loads_plain_and_wrapped_state_dicts() -> None:
    """Trainer resumes with load_state_dict(strict=False): a wrapped model must take a plain checkpoint."""
    family = FAMILIES["gpt2"]
    source, inputs = family.build(seed=3), family.inputs()
    target = family.build(seed=4)
    hf_adamp.apply_weight_norm(target)
    result = target.load_state_dict(source.state_dict(), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "parametrizations" in k]
    torch.testing.assert_close(logits(target, inputs), logits(source, inputs))
    hf_adamp.apply_weight_norm(source)
    fresh = family.build(seed=5)
    hf_adamp.apply_weight_norm(fresh)
    fresh.load_state_dict(source.state_dict())
    torch.testing.assert_close(logits(fresh, inputs), logits(source, inputs))


def test_weight_norm_state_dict_folds_a_given_state_dict() -> None:
    family = FAMILIES["gpt2"]
    model, inputs = family.build(), family.inputs()
    hf_adamp.apply_weight_norm(model)
    plain = hf_adamp.weight_norm_state_dict(model)
    assert not [k for k in plain if "parametrizations" in k]
    assert plain["transformer.h.0.mlp.c_fc.weight"].shape == (16, 64)
    vanilla = family.build(seed=9)
    vanilla.load_state_dict(plain)
    torch.testing.assert_close(logits(vanilla, inputs), logits(model, inputs))
    broken = model.state_dict()
    del broken["transformer.h.0.attn.c_attn.parametrizations.weight.original1"]
    with pytest.raises(KeyError, match="original1"):
        hf_adamp.weight_norm_state_dict(model, broken)


def test_conv1d_fold_is_contiguous_and_trainable() -> None:
    model = FAMILIES["gpt2"].build()
    hf_adamp.apply_weight_norm(model)
    hf_adamp.remove_weight_norm(model)
    weight = model.transformer.h[0].attn.c_attn.weight
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert weight.is_contiguous() and weight.requires_grad and isinstance(weight, torch.nn.Parameter)


def test_parser_exposes_weight_norm_flags() -> None:
    parser = T.HfArgumentParser((T.TrainingArguments, hf_adamp.WeightNormArguments))
    _, wn = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--weight_norm", "--weight_norm_exclude", "mlp", "fc", "--report_to", "none"]
    )
    assert wn.weight_norm and wn.weight_norm_exclude == ["mlp", "fc"]
    model = FAMILIES["bart"].build()
    summary = wn.apply(model)
    assert not [n for n in summary.wrapped if "fc" in n]
    _, off = parser.parse_args_into_dataclasses(["--output_dir", "x", "--report_to", "none"])
    assert off.apply(FAMILIES["bart"].build()) is None
