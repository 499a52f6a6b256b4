"""Trainer with weight norm: plain checkpoints that vanilla transformers loads, gains free of weight decay."""

from __future__ import annotations

import torch
import transformers as T
from test_weight_norm_helpers import FAMILIES, VOCAB, logits, vanilla_logits

import hf_adamp


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 8) -> None:
        self.ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _RecordLogits(T.TrainerCallback):
    """Logits of the live (wrapped) model at each save, to compare with what was written."""

    def __init__(self, inputs: dict[str, torch.Tensor]) -> None:
        self.inputs, self.at_save = inputs, {}

    def on_save(self, args, state, control, model=None, **kwargs):
        model.eval()
        self.at_save[state.global_step] = logits(model, self.inputs)
        model.train()


def _trainer(model, out_dir, callbacks=(), max_steps: int = 4) -> T.Trainer:
    args = T.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to="none",
        use_cpu=True,
        logging_steps=100,
        seed=0,
        data_seed=0,
        save_only_model=False,
        disable_tqdm=True,
    )
    return T.Trainer(
        model=model,
        args=args,
        train_dataset=_Tokens(),
        callbacks=list(callbacks),
        optimizer_cls_and_kwargs=(hf_adamp.AdamP, {"delta": 0.1, "wd_ratio": 0.1}),
    )


def test_trainer_checkpoints_load_in_vanilla_transformers_and_gains_skip_decay(tmp_path) -> None:
    family = FAMILIES["gpt2"]
    model, inputs = family.build(), family.inputs()
    parser = T.HfArgumentParser(hf_adamp.WeightNormArguments)  # the way a script turns it on: --weight_norm
    (wn_args,) = parser.parse_args_into_dataclasses(["--weight_norm"])
    summary = wn_args.apply(model)
    assert set(summary.wrapped) == family.expected

    record = _RecordLogits(inputs)
    trainer = _trainer(model, tmp_path / "run", [record])
    trainer.train()
    trainer.save_model(tmp_path / "final")

    # Weight decay: gains g in the no-decay group, directions v in the decay group.
    gains = {p for n, p in model.named_parameters() if n in hf_adamp.weight_norm_gain_names(model)}
    directions = {p for n, p in model.named_parameters() if n.endswith("parametrizations.weight.original1")}
    assert len(gains) == len(directions) == len(family.expected)
    for group in trainer.optimizer.param_groups:
        members = set(group["params"])
        if group["weight_decay"] > 0:
            assert not members & gains and directions <= members
        else:
            assert gains <= members
    # The projection branch is taken for v inside Trainer too.
    decisions = trainer.optimizer.optimizer.projection_decisions()  # AcceleratedOptimizer wraps AdamP
    assert {decisions[v] for v in directions} == {"channel"}

    # Checkpoints are plain: no parametrization keys, and vanilla transformers reproduces the logits.
    jobs = {step: (family.model_cls, str(tmp_path / "run" / f"checkpoint-{step}"), inputs) for step in (2, 4)}
    jobs["final"] = (family.model_cls, str(tmp_path / "final"), inputs)
    loaded = vanilla_logits(jobs, tmp_path)
    torch.testing.assert_close(loaded[2], record.at_save[2])
    torch.testing.assert_close(loaded[4], record.at_save[4])
    torch.testing.assert_close(loaded["final"], logits(model.eval(), inputs))
    assert not torch.allclose(loaded[2], loaded[4])  # training moved the weights

    # Resuming a wrapped model from a plain checkpoint continues the same run.
    resumed = family.build(seed=7)
    hf_adamp.apply_weight_norm(resumed)
    _trainer(resumed, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    torch.testing.assert_close(logits(resumed.eval(), inputs), record.at_save[4])


def test_decay_names_without_weight_norm_are_untouched(tmp_path) -> None:
    model = FAMILIES["llama"].build()
    trainer = _trainer(model, tmp_path)
    names = trainer.get_decay_parameter_names(model)
    assert "model.layers.0.self_attn.q_proj.weight" in names
    hf_adamp.apply_weight_norm(model)
    names = trainer.get_decay_parameter_names(model)
    assert "model.layers.0.self_attn.q_proj.parametrizations.weight.original1" in names
    assert not [n for n in names if n.endswith("original0")]
