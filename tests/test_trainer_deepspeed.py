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
from hf_adamp.integrations import DeepSpeedConfigError  # noqa: E402
from hf_adamp.integrations.deepspeed import innermost_optimizer  # noqa: E402

pytestmark = pytest.mark.slow


def tiny_model(weight_norm: bool = False) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0))
    if weight_norm:  # scale-invariant directions: AdamP's channel projection differs from AdamW there
        hf_adamp.apply_weight_norm(model)
    return model


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


def ds_trainer(tmp_path: Path, optim: str, zero: dict | None, weight_norm: bool = False, **top_level) -> Trainer:
    """A Trainer for 2 steps; ``zero=None`` gives the same run without DeepSpeed."""
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
        deepspeed=ds_config if zero is not None else None,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(model=tiny_model(weight_norm), args=args, train_dataset=tiny_data())


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


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trained weights; under ZeRO-3 on one rank, each parameter's partition is the whole of it."""
    out = {}
    for name, p in trainer.model.named_parameters():
        full = p.ds_tensor[: p.ds_numel].view(p.ds_shape) if hasattr(p, "ds_tensor") else p
        out[name] = full.detach().float().clone()
    return out


@pytest.mark.parametrize(
    "name, zero",
    [("adamp", {"stage": 1}), ("sgdp", {"stage": 2}), ("adamp", {"stage": 3}), ("adamp", {"stage": 2, **OFFLOAD})],
    ids=["adamp-zero1", "sgdp-zero2", "adamp-zero3", "adamp-zero2-offload"],
)
def test_zero_runs_our_optimizer_with_the_numbers_of_a_plain_run(one_rank, tmp_path, name, zero):
    """The layout is attached at prepare time, so the flat partitions are stepped with the projection."""
    top = {"zero_force_ds_cpu_optimizer": False} if "offload_optimizer" in zero else {}
    trainer = ds_trainer(tmp_path, name, zero, weight_norm=True, **top)
    trainer.train()
    inner = innermost_optimizer(trainer.optimizer)
    assert type(inner) is {"adamp": hf_adamp.AdamP, "sgdp": hf_adamp.SGDP}[name]
    assert inner._layouts, "no sharding layout attached: the step would have skipped the projection"
    assert "channel" in inner.projection_decisions().values()
    sharded = full_weights(trainer)

    plain = ds_trainer(tmp_path / "plain", name, None, weight_norm=True)
    plain.train()
    # atol: Adam divides near-zero gradients (the attention key bias has an exactly-zero true gradient) by
    # their own size, which turns rounding differences of the engines into up to ~5e-6 after two steps
    for n, p in full_weights(plain).items():
        assert torch.allclose(sharded[n], p, rtol=1e-5, atol=2e-5), n


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
    _, optimizer, _ = prepare({"stage": 2})
    assert innermost_optimizer(optimizer)._layouts  # prepare attached the ZeRO layout
