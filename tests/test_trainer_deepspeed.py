"""Trainer and Accelerate + DeepSpeed on CPU, one process (world size 1): the optimizer that runs is ours.

DeepSpeed's first start on a machine builds a small op (~30 s); later starts reuse it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from transformers import Trainer, TrainingArguments  # noqa: E402

import hf_adamp  # noqa: E402
from hf_adamp.integrations import DeepSpeedConfigError, ShardingNotSupportedError  # noqa: E402
from hf_adamp.integrations.deepspeed import innermost_optimizer  # noqa: E402

pytestmark = pytest.mark.slow


def tiny_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0))


def tiny_data(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids} for _ in range(n)]


OFFLOAD = {"offload_optimizer": {"device": "cpu"}}


@pytest.fixture
def one_rank():
    """The environment of a one-process DeepSpeed launch on CPU, restored afterwards (TrainingArguments
    also sets ACCELERATE_USE_DEEPSPEED and friends in os.environ)."""
    saved = dict(os.environ)
    os.environ.update(
        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    yield
    from accelerate.state import AcceleratorState, PartialState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    os.environ.clear()
    os.environ.update(saved)
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    # The gloo process group (world size 1) stays: DeepSpeed caches its groups for the whole process.


def ds_trainer(tmp_path: Path, optim: str, zero: dict, **top_level) -> Trainer:
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        **top_level,
    }
    args = TrainingArguments(
        str(tmp_path / "out"),
        optim=optim,
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        deepspeed=ds_config,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(model=tiny_model(), args=args, train_dataset=tiny_data())


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_stage0_keeps_our_optimizer(one_rank, tmp_path, name):
    trainer = ds_trainer(tmp_path, name, {"stage": 0})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    inner = innermost_optimizer(trainer.optimizer)
    assert type(inner) is {"adamp": hf_adamp.AdamP, "sgdp": hf_adamp.SGDP}[name]
    assert trainer.deepspeed.optimizer is inner  # DeepSpeed runs our optimizer itself, unwrapped
    assert [g["weight_decay"] for g in inner.param_groups] == [0.1, 0.0]
    assert inner.projection_decisions()  # our step ran on full-shape parameters
    assert all(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())


def test_optimizer_section_conflicts_with_optim(one_rank, tmp_path):
    trainer = ds_trainer(tmp_path, "adamp", {"stage": 0}, optimizer={"type": "AdamW", "params": {"lr": "auto"}})
    with pytest.raises(DeepSpeedConfigError, match=r'hf_adamp\.AdamP.*Remove the "optimizer" section'):
        trainer.train()


def test_offload_with_forced_cpu_optimizer_is_refused(one_rank, tmp_path):
    trainer = ds_trainer(tmp_path, "adamp", {"stage": 2, **OFFLOAD})
    with pytest.raises(DeepSpeedConfigError, match='add "zero_force_ds_cpu_optimizer": false at the top level'):
        trainer.train()


def test_offload_runs_our_radam_when_allowed(one_rank, tmp_path):
    trainer = ds_trainer(tmp_path, "radam", {"stage": 2, **OFFLOAD}, zero_force_ds_cpu_optimizer=False)
    trainer.train()
    assert type(innermost_optimizer(trainer.optimizer)) is hf_adamp.RAdam  # not DeepSpeedCPUAdam
    assert trainer.state.global_step == 2


def test_offload_allowed_adamp_hits_the_sharding_guard(one_rank, tmp_path):
    trainer = ds_trainer(tmp_path, "adamp", {"stage": 2, **OFFLOAD}, zero_force_ds_cpu_optimizer=False)
    with pytest.raises(ShardingNotSupportedError, match="AdamP under DeepSpeed ZeRO stage 2"):
        trainer.train()


@pytest.mark.parametrize("name, stage", [("adamp", 2), ("sgdp", 1), ("adamp", 3)])
def test_zero_sharding_is_refused_until_layouts_exist(one_rank, tmp_path, name, stage):
    trainer = ds_trainer(tmp_path, name, {"stage": stage})
    cls = {"adamp": "AdamP", "sgdp": "SGDP"}[name]
    with pytest.raises(ShardingNotSupportedError, match=f"{cls} under DeepSpeed ZeRO stage {stage}.*act as AdamW"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_plain_accelerate_loop_hits_the_same_checks(one_rank):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    def prepare(zero: dict, **top_level):
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
        plugin = DeepSpeedPlugin(hf_ds_config={**config, "zero_optimization": zero, **top_level})
        accelerator = Accelerator(deepspeed_plugin=plugin)
        model = tiny_model()
        loader = torch.utils.data.DataLoader(tiny_data(), batch_size=2)
        return accelerator.prepare(model, hf_adamp.AdamP(model.parameters(), lr=1e-3), loader)

    with pytest.raises(DeepSpeedConfigError, match="zero_force_ds_cpu_optimizer"):
        prepare({"stage": 2, **OFFLOAD})
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ShardingNotSupportedError, match="ZeRO stage 2"):
        prepare({"stage": 2})
