"""Telemetry: the projection record, the Trainer callback, and the plot command."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import MODES, forced_grad
from torch.nn.utils.parametrizations import weight_norm
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import hf_adamp
from hf_adamp import plot, telemetry


def tiny_wn_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers"):
            weight_norm(module, dim=0)  # each output row's direction is scale-invariant
    return model


class Patterns(torch.utils.data.Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        ids = (torch.arange(16) * (i % 5 + 1) + i) % 64
        return {"input_ids": ids, "labels": ids}


def run_trainer(tmp_path, name: str, make_opt) -> list[dict]:
    model = tiny_wn_llama()
    args = TrainingArguments(
        output_dir=str(tmp_path / name),
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        weight_decay=0.0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Patterns(), optimizers=(make_opt(model), None))
    telemetry.add_projection_logging(trainer)
    trainer.train()
    trainer.state.save_to_json(str(tmp_path / name / "trainer_state.json"))
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("telemetry")
    return tmp, {
        "adamw": run_trainer(tmp, "adamw", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)),
        "adamp": run_trainer(tmp, "adamp", lambda m: hf_adamp.AdamP(m.parameters(), lr=1e-2)),
    }


def test_adamw_grows_the_scale_invariant_norm_and_adamp_does_not(runs):
    _, logs = runs
    growth = {}
    for name, history in logs.items():
        norms = [h["scale_invariant/weight_norm"] for h in history]
        growth[name] = norms[-1] / norms[0] - 1
        steps = [h["scale_invariant/effective_step_size"] for h in history]
        assert all(s > 0 for s in steps)
    assert growth["adamw"] > 0.2, growth
    assert growth["adamw"] > 5 * abs(growth["adamp"]), growth


def test_adamp_logs_its_decisions(runs):
    _, logs = runs
    for h in logs["adamp"]:
        assert h["projection/channel"] >= 14  # the 14 weight-normalised directions (7 per layer)
        assert h["projection/projected_weight_norm"] > 0
    assert all("projection/channel" not in h for h in logs["adamw"])


def test_logged_counts_match_the_plain_reference_decisions():
    """The record's counts equal the decisions of the plain path run on the same inputs."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) for s in [(6, 5), (4, 3, 2), (1, 7), (8, 1), (5,)]]
    for step in range(8):
        counts = []
        for foreach in (False, True):
            ps = [p.clone().requires_grad_() for p in base]
            opt = hf_adamp.AdamP(ps, lr=1e-2, foreach=foreach)
            g = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = forced_grad(p, MODES[step % 4], g)
            opt.step()
            decided = list(opt.projection_decisions().values())
            metrics = telemetry.projection_metrics(opt)
            assert [metrics[f"projection/{k}"] for k in ("channel", "layer", "none")] == [
                float(decided.count(k)) for k in ("channel", "layer", "none")
            ]
            counts.append(decided)
        assert counts[0] == counts[1]


def test_plot_writes_pngs_from_trainer_state(runs, tmp_path):
    run_dir, _ = runs
    written = plot.plot_runs([run_dir / "adamw", run_dir / "adamp"], tmp_path / "plots", labels=["AdamW", "AdamP"])
    names = {p.name for p in written}
    assert {"loss.png", "weight_norm.png", "effective_step_size.png"} <= names
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plot_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        plot.plot_runs([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no trainer_state.json"):
        plot.plot_runs([tmp_path / "empty"], tmp_path / "out")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nothing": 1}))
    with pytest.raises(ValueError, match="log_history"):
        plot.plot_runs([bad], tmp_path / "out")
    with pytest.raises(SystemExit, match="error:"):
        plot.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
