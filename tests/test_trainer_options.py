"""optim="adamp" | "sgdp" | "radam" with the stock transformers Trainer, TrainingArguments and HfArgumentParser."""

from __future__ import annotations

import enum
import importlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)
from transformers.training_args import OptimizerNames

import hf_adamp
from hf_adamp.integrations import transformers as hf_tr

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_VALUES = ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adagrad", "rmsprop")


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def tiny_data(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids} for _ in range(n)]


def make_args(tmp_path: Path, **kwargs) -> TrainingArguments:
    defaults = dict(
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(kwargs)
    return TrainingArguments(str(tmp_path / "out"), **defaults)


def group_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[float, set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


# ----- Trainer runs with each name, and the optimizer really is ours -----
EXPECTED = {
    "adamp": (
        hf_adamp.AdamP,
        "delta=0.2, wd_ratio=0.5, nesterov=true",
        {"betas": (0.8, 0.95), "eps": 1e-6, "delta": 0.2, "wd_ratio": 0.5, "nesterov": True},
    ),
    "sgdp": (
        hf_adamp.SGDP,
        "momentum=0.5,dampening=0.1,nesterov=false,eps=1e-7,delta=0.3,wd_ratio=0.2",
        {"momentum": 0.5, "dampening": 0.1, "nesterov": False, "eps": 1e-7, "delta": 0.3, "wd_ratio": 0.2},
    ),
    "radam": (
        hf_adamp.RAdam,
        "decoupled_weight_decay=true",
        {"betas": (0.8, 0.95), "eps": 1e-6, "decoupled_weight_decay": True},
    ),
}


@pytest.mark.parametrize("name", ["adamp", "sgdp", "radam"])
def test_trainer_trains_with_our_optimizer(tmp_path, name):
    cls, optim_args, expected = EXPECTED[name]
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model=model, args=make_args(tmp_path, optim=name, optim_args=optim_args), train_dataset=tiny_data()
    )
    trainer.train()

    optimizer = trainer.optimizer.optimizer  # unwrap accelerate's AcceleratedOptimizer
    assert type(optimizer) is cls
    assert trainer.state.global_step == 3
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)

    decay, no_decay = group_names(model, optimizer)
    assert decay[0] == pytest.approx(0.1) and no_decay[0] == 0.0
    assert "transformer.h.0.attn.c_attn.weight" in decay[1] and "transformer.wte.weight" in decay[1]
    assert {"transformer.h.0.attn.c_attn.bias", "transformer.h.0.ln_1.weight", "transformer.ln_f.bias"} <= no_decay[1]
    assert decay[1] == set(trainer.get_decay_parameter_names(model)) & set(dict(model.named_parameters()))
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-2)
        for key, value in expected.items():
            assert group[key] == value and type(group[key]) is type(value), key
    if name != "radam":  # our phased step ran: it records what it decided for each matrix
        assert len(optimizer.projection_decisions()) == sum(p.dim() > 1 for p in model.parameters())


def test_sgdp_trainer_defaults(tmp_path):
    args = make_args(tmp_path, optim="sgdp")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is hf_adamp.SGDP
    assert kwargs == {"lr": 1e-2, "momentum": hf_tr.SGDP_TRAINER_MOMENTUM}
    assert hf_tr.SGDP_TRAINER_MOMENTUM == 0.9


def test_adamp_with_delta_zero_is_adamw_with_the_same_trainer_arguments(tmp_path):
    """delta=0 never projects, so AdamP must then match optim="adamw_torch" step for step: lr, betas, eps,
    weight decay and the decay/no-decay groups all carry the same meaning. (A larger eps keeps the key bias,
    whose gradient is ~0 under softmax, from amplifying rounding differences.)"""
    results = {}
    for name, optim_args in (("adamw_torch", None), ("adamp", "delta=0")):
        model = tiny_model()
        args = make_args(
            tmp_path, optim=name, optim_args=optim_args, learning_rate=3e-2, weight_decay=0.5, adam_epsilon=1e-3
        )
        Trainer(model=model, args=args, train_dataset=tiny_data()).train()
        results[name] = dict(model.named_parameters())
    for n, p in results["adamw_torch"].items():
        torch.testing.assert_close(results["adamp"][n], p, rtol=1e-5, atol=1e-6, msg=n)
    changed = [
        n for n, p in results["adamw_torch"].items() if not torch.equal(p, dict(tiny_model().named_parameters())[n])
    ]
    assert changed


# ----- the public entry point -----
@pytest.mark.parametrize("name", ["adamp", "sgdp", "radam"])
def test_create_optimizer_matches_trainer(tmp_path, name):
    args = make_args(tmp_path, optim=name, optim_args=EXPECTED[name][1])
    model = tiny_model()
    ours = hf_adamp.create_optimizer(model, args)
    stock = Trainer(model=model, args=args).create_optimizer()
    assert type(ours) is type(stock)
    assert group_names(model, ours) == group_names(model, stock)
    for g_ours, g_stock in zip(ours.param_groups, stock.param_groups, strict=True):
        assert {k: v for k, v in g_ours.items() if k != "params"} == {k: v for k, v in g_stock.items() if k != "params"}


def test_create_optimizer_refuses_builtin_names(tmp_path):
    with pytest.raises(ValueError, match="hf-adamp optimizers only.*'adamw_torch'"):
        hf_adamp.create_optimizer(tiny_model(), make_args(tmp_path, optim="adamw_torch"))


def test_decay_names_follow_the_trainer_rule():
    model = tiny_model()
    assert hf_tr.decay_parameter_names(model) == Trainer.get_decay_parameter_names(None, model)


# ----- TrainingArguments: parser, JSON, pickle, set_optimizer -----
def test_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "adamp", "--optim_args", "delta=0.2,nesterov=true", "--use_cpu"]
    )
    assert args.optim is OptimizerNames.ADAMP
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is hf_adamp.AdamP
    assert kwargs["delta"] == 0.2 and type(kwargs["delta"]) is float and kwargs["nesterov"] is True
    optim_action = next(a for a in parser._actions if a.dest == "optim")
    assert {"adamp", "sgdp", "radam", *BUILTIN_VALUES} <= set(optim_action.choices)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "adamq"])


def test_json_round_trip(tmp_path):
    args = make_args(tmp_path, optim="sgdp", optim_args="momentum=0.8")
    as_dict = json.loads(args.to_json_string())
    assert as_dict["optim"] == "sgdp" and args.to_dict()["optim"] == "sgdp"
    init_fields = {f.name for f in fields(TrainingArguments) if f.init}
    again = TrainingArguments(**{k: v for k, v in as_dict.items() if k in init_fields})
    assert again.optim is OptimizerNames.SGDP and again.optim_args == "momentum=0.8"
    assert Trainer.get_optimizer_cls_and_kwargs(again) == (hf_adamp.SGDP, {"lr": 1e-2, "momentum": 0.8})


def test_training_args_bin_reloads_in_a_fresh_process(tmp_path):
    path = tmp_path / "training_args.bin"
    torch.save(make_args(tmp_path, optim="radam", optim_args="decoupled_weight_decay=false"), path)
    # A fresh interpreter: hf_adamp is imported before transformers, so registration happens lazily
    # when unpickling imports transformers.training_args.
    script = textwrap.dedent(
        f"""
        import sys, torch, hf_adamp
        assert "transformers.training_args" not in sys.modules
        args = torch.load({str(path)!r}, weights_only=False)
        from transformers import Trainer
        from transformers.training_args import OptimizerNames
        assert args.optim is OptimizerNames.RADAM, args.optim
        print(Trainer.get_optimizer_cls_and_kwargs(args))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "hf_adamp.optim.radam.RAdam" in out.stdout and "'decoupled_weight_decay': False" in out.stdout


def test_set_optimizer(tmp_path):
    args = make_args(tmp_path).set_optimizer(name="adamp", learning_rate=2e-3, weight_decay=0.01, args="delta=0.3")
    assert args.optim is OptimizerNames.ADAMP
    model = tiny_model()
    optimizer = Trainer(model=model, args=args).create_optimizer()
    assert type(optimizer) is hf_adamp.AdamP
    assert optimizer.param_groups[0]["delta"] == 0.3 and optimizer.param_groups[0]["weight_decay"] == 0.01
    assert optimizer.param_groups[0]["lr"] == 2e-3


# ----- built-in names, idempotence -----
@pytest.mark.parametrize(
    "name, optim_args, expected",
    [
        ("adamw_torch", None, torch.optim.AdamW),
        ("sgd", "momentum=0.9", torch.optim.SGD),
        ("adagrad", None, torch.optim.Adagrad),
        ("rmsprop", None, torch.optim.RMSprop),
        ("adafactor", None, "Adafactor"),
    ],
)
def test_builtin_names_still_work(tmp_path, name, optim_args, expected):
    model = tiny_model()
    optimizer = Trainer(model=model, args=make_args(tmp_path, optim=name, optim_args=optim_args)).create_optimizer()
    if isinstance(expected, str):
        assert type(optimizer).__name__ == expected
    else:
        assert type(optimizer) is expected
    if name == "sgd":  # the stock optim_args path still runs for built-in names
        assert optimizer.param_groups[0]["momentum"] == 0.9


REGISTRATION_SNAPSHOT = """
import sys
import accelerate.accelerator
import transformers.integrations.deepspeed as tr_ds
from transformers import Trainer
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
from transformers.training_args import OptimizerNames


def registration_snapshot():
    wrapped = (
        Trainer.get_optimizer_cls_and_kwargs,
        accelerate.accelerator.Accelerator._prepare_deepspeed,
        tr_ds.deepspeed_optim_sched,
    )
    return {
        "names": list(OptimizerNames._member_names_),
        "values": list(OptimizerNames._value2member_map_),
        "handlers": len(_OPTIMIZER_HANDLERS),
        "finders": sum(getattr(f, "_hf_adamp_post_import_finder_", False) for f in sys.meta_path),
        "ours": [getattr(fn, "_hf_adamp_", False) for fn in wrapped],
        "two_layers": [getattr(fn.__wrapped__, "_hf_adamp_", False) for fn in wrapped],
    }
"""


def test_registration_is_idempotent(tmp_path):
    namespace: dict = {}
    exec(REGISTRATION_SNAPSHOT, namespace)
    snapshot = namespace["registration_snapshot"]
    before = snapshot()
    assert before["ours"] == [True, True, True] and before["two_layers"] == [False, False, False]
    assert before["finders"] <= 1
    assert [n for n in before["names"] if n in ("ADAMP", "SGDP", "RADAM")] == ["ADAMP", "SGDP", "RADAM"]

    import accelerate.accelerator
    import transformers.integrations.deepspeed as tr_ds
    import transformers.trainer
    import transformers.trainer_optimizer
    import transformers.training_args

    importlib.import_module("hf_adamp")
    hf_adamp.integrations.install()
    hf_adamp.integrations.install()
    hf_tr.register_optimizer_names(transformers.training_args)
    hf_tr.register_handlers(transformers.trainer_optimizer)
    hf_tr.register_trainer(transformers.trainer)
    hf_adamp.integrations.deepspeed.patch_accelerator(accelerate.accelerator)
    hf_adamp.integrations.deepspeed.patch_transformers_deepspeed(tr_ds)

    assert snapshot() == before
    args = make_args(tmp_path, optim="adamp", optim_args="delta=0.25")
    assert Trainer(model=tiny_model(), args=args).create_optimizer().param_groups[0]["delta"] == 0.25
    for value in BUILTIN_VALUES:
        assert OptimizerNames(value).value == value


def test_reloaded_package_registers_once(tmp_path):
    """A second copy of the integration modules (reload) replaces our wrappers instead of stacking them."""
    script = REGISTRATION_SNAPSHOT + textwrap.dedent(
        """
        import importlib
        import hf_adamp
        before = registration_snapshot()
        for name in ("hf_adamp.integrations.transformers", "hf_adamp.integrations.deepspeed"):
            importlib.reload(importlib.import_module(name)).install()
        importlib.reload(importlib.import_module("hf_adamp.integrations")).install()
        after = registration_snapshot()
        assert after == before, (before, after)
        assert before["ours"] == [True, True, True] and before["two_layers"] == [False, False, False], before
        from transformers import TrainingArguments
        args = TrainingArguments("out", optim="sgdp", optim_args="momentum=0.5", use_cpu=True, report_to=[])
        print(Trainer.get_optimizer_cls_and_kwargs(args))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "hf_adamp.optim.sgdp.SGDP" in out.stdout and "'momentum': 0.5" in out.stdout


def test_enum_members_behave_like_builtin_ones():
    member = OptimizerNames("sgdp")
    assert member is OptimizerNames.SGDP and member == "sgdp" and isinstance(member, enum.Enum)
    assert OptimizerNames["SGDP"] is member and member in list(OptimizerNames)
    assert OptimizerNames.ADAMW_TORCH.value == "adamw_torch"
    with pytest.raises(ValueError, match="not a valid OptimizerNames"):
        OptimizerNames("adamq")


# ----- optim_args: real types, clear errors -----
def test_optim_args_types():
    kwargs = hf_adamp.integrations.parse_optim_args(
        "sgdp", " momentum=0 , nesterov=False, dampening=0.5,eps=1e-6, delta=1, wd_ratio=0 ,"
    )
    assert kwargs == {"momentum": 0.0, "nesterov": False, "dampening": 0.5, "eps": 1e-6, "delta": 1.0, "wd_ratio": 0.0}
    assert all(type(v) is (bool if k == "nesterov" else float) for k, v in kwargs.items())
    assert hf_adamp.integrations.parse_optim_args("adamp", {"nesterov": "1", "delta": 0.5}) == {
        "nesterov": True,
        "delta": 0.5,
    }
    assert hf_adamp.integrations.parse_optim_args("radam", None) == {}
    assert hf_adamp.integrations.parse_optim_args("adamp", "fused=false") == {"fused": False}
    assert hf_adamp.integrations.parse_optim_args("sgdp", "fused=true") == {"fused": True}


@pytest.mark.parametrize(
    "name, optim_args, message",
    [
        ("adamp", "foo=1", r"unknown key 'foo' for optim='adamp'\. Valid keys: delta, fused, nesterov, wd_ratio\."),
        ("sgdp", "beta=0.9", "Valid keys: dampening, delta, eps, fused, momentum, nesterov, wd_ratio"),
        ("radam", "delta=0.1", "Valid keys: decoupled_weight_decay"),
        ("adamp", "eps=1e-6", "Set it with the TrainingArguments field adam_epsilon"),
        ("adamp", "lr=0.1", "field learning_rate"),
        ("adamp", "delta=-1", r"delta=-1 is out of range: delta must be in \[0, inf\]"),
        ("adamp", "wd_ratio=1.5", r"wd_ratio must be in \[0, 1\]"),
        ("sgdp", "momentum=1", r"momentum must be in \[0, 1\)"),
        ("adamp", "delta=nan", "must be a finite number"),
        ("adamp", "nesterov=maybe", "nesterov=maybe is not a boolean: use true or false"),
        ("adamp", "delta=abc", "delta=abc is not a number"),
        ("adamp", "delta=0.1=2", "delta=0.1=2 is not a number"),
        ("adamp", "nesterov", "'nesterov' is not of the form key=value"),
        ("adamp", "delta=0.1,delta=0.2", "delta is given twice"),
        ("sgdp", "momentum=0,nesterov=true", "nesterov=true needs momentum > 0"),
    ],
)
def test_bad_optim_args(name, optim_args, message):
    with pytest.raises(ValueError, match=message):
        hf_adamp.integrations.parse_optim_args(name, optim_args)


@pytest.mark.parametrize(
    "optim_args, message",
    [("nesterov", "not of the form key=value"), ("foo=1", "Valid keys: delta, fused, nesterov, wd_ratio")],
)
def test_bad_optim_args_through_the_trainer(tmp_path, optim_args, message):
    """Our parser runs before the stock one, which would fail on these with an unpacking error."""
    args = make_args(tmp_path, optim="adamp")
    args.optim_args = optim_args  # set after construction, which would have refused it
    trainer = Trainer(model=tiny_model(), args=args)
    with pytest.raises(ValueError, match=message):
        trainer.create_optimizer()


def test_bad_optim_args_fail_when_training_arguments_are_built(tmp_path):
    """A typo fails at TrainingArguments(...) (and so when HfArgumentParser parses the command line), before
    the script loads a model or data; set_optimizer checks too. Built-in names keep transformers' own rules."""
    with pytest.raises(ValueError, match=r"unknown key 'detla' for optim='adamp'\. Valid keys: delta"):
        make_args(tmp_path, optim="adamp", optim_args="detla=0.1")
    with pytest.raises(ValueError, match="momentum must be in"):
        make_args(tmp_path, optim=OptimizerNames("sgdp"), optim_args="momentum=2")
    parser = HfArgumentParser(TrainingArguments)
    with pytest.raises(ValueError, match="delta=abc is not a number"):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "adamp", "--optim_args", "delta=abc"]
        )
    with pytest.raises(ValueError, match="Valid keys: decoupled_weight_decay"):
        make_args(tmp_path).set_optimizer(name="radam", args="delta=0.1")
    assert make_args(tmp_path, optim="adamp", optim_args="delta=0.2").optim_args == "delta=0.2"
    assert make_args(tmp_path, optim="sgd", optim_args="momentum=0.9").optim_args == "momentum=0.9"
