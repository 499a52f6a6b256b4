"""Every file under configs/ is exercised as far as a CPU allows.

- experiment YAMLs: parse with the scripts' HfArgumentParser; paired configs differ only in what they compare;
  paper-scale models are counted on the meta device; every CPU-scale config trains 2 steps for real.
- accelerate YAMLs: load with accelerate's own config loader; DeepSpeed JSONs: no "optimizer" section,
  and ZeRO-2, ZeRO-3 and ZeRO-2-Offload each run through run_clm.py + Trainer + DeepSpeed in one CPU process;
  zero2.json also on 2 CPU ranks with AdamP (sharding layouts attached by hf_adamp), against one process.
FSDP2 cannot run on CPU through accelerate/Trainer: its config is only loaded and checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from _dist_helpers import GLOO_LAUNCHER
from test_experiments_common import (
    CONFIGS,
    QUIET,
    ROOT,
    clm_data_args,
    free_port,
    needs_multi30k,
    needs_wikitext,
    run_clm,
    run_translation,
    translation_data_args,
)

EXPERIMENTS = sorted((CONFIGS / "experiments").glob("*/*.yaml"))
CPU_CONFIGS = [p for p in EXPERIMENTS if p.parent.name == "cpu"]
ACCELERATE = sorted((CONFIGS / "accelerate").glob("*.yaml"))
DEEPSPEED = sorted((CONFIGS / "deepspeed").glob("*.json"))
EXPECTED_NAMES = {
    "clm_adamw", "clm_adamp", "clm_adamw_wn", "clm_adamp_wn", "translation_adam_warmup",
    "translation_adam_nowarmup", "translation_radam_nowarmup", "translation_adamp",
}  # fmt: skip


def parse_experiment(path: Path, *overrides: str):
    """(model, data, training, weight-norm) arguments of an experiment config, as its script parses them."""
    import run_clm
    import run_translation
    from _common import parse_arguments
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainingArguments

    import hf_adamp

    if path.stem.startswith("clm"):
        types = (run_clm.ModelArguments, run_clm.DataArguments, TrainingArguments, hf_adamp.WeightNormArguments)
    else:
        types = (run_translation.ModelArguments, run_translation.DataArguments, Seq2SeqTrainingArguments,
                 hf_adamp.WeightNormArguments)  # fmt: skip
    return parse_arguments(HfArgumentParser(types), [str(path), *overrides])


def test_the_experiment_grid_is_complete():
    for scale in ("paper", "cpu"):
        assert {p.stem for p in EXPERIMENTS if p.parent.name == scale} == EXPECTED_NAMES


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_experiment_config_parses_to_what_its_name_says(path, tmp_path):
    model, data, train, wn = parse_experiment(path, "--output_dir", str(tmp_path))
    name = path.stem
    assert model.model_size == ("paper" if path.parent.name == "paper" else "tiny")
    optim = {"adamw": "adamw_torch", "adam": "adamw_torch", "adamp": "adamp", "radam": "radam"}[name.split("_")[1]]
    assert train.optim == optim
    assert wn.weight_norm == name.endswith("_wn")
    if optim == "adamp":
        from hf_adamp.integrations import parse_optim_args

        assert parse_optim_args("adamp", train.optim_args) == {"delta": 0.1, "wd_ratio": 0.1, "nesterov": False}
    if "nowarmup" in name:
        assert train.warmup_steps == 0 and train.get_warmup_steps(10**6) == 0
    elif name.startswith("translation"):
        assert train.warmup_steps > 0
    if name.startswith("translation"):
        assert train.predict_with_generate and train.label_smoothing_factor == 0.1
        assert (train.adam_beta2, train.lr_scheduler_type) == (0.98, "inverse_sqrt")
        assert data.dataset_name == "bbaaaa/iwslt14-de-en"
    else:
        wikitext = "wikitext-103-raw-v1" if model.model_size == "paper" else "wikitext-2-raw-v1"
        assert data.dataset_config_name == wikitext
    assert train.output_dir == str(tmp_path)  # a flag after the file overrides it


@pytest.mark.parametrize("scale", ["paper", "cpu"])
def test_compared_configs_differ_only_in_what_they_compare(scale):
    def load(name):
        return yaml.safe_load((CONFIGS / "experiments" / scale / f"{name}.yaml").read_text())

    def strip(cfg, *keys):
        return {k: v for k, v in cfg.items() if k not in {"output_dir", "optim", "optim_args", *keys}}

    clm = [load(n) for n in ("clm_adamw", "clm_adamp", "clm_adamw_wn", "clm_adamp_wn")]
    assert all(strip(c, "weight_norm") == strip(clm[0], "weight_norm") for c in clm)
    mt = [load(n) for n in ("translation_adam_warmup", "translation_adam_nowarmup", "translation_radam_nowarmup",
                            "translation_adamp")]  # fmt: skip
    assert all(strip(c, "warmup_steps") == strip(mt[0], "warmup_steps") for c in mt)
    assert len({c["output_dir"] for c in clm + mt}) == 8


def test_paper_scale_models_have_the_papers_shapes():
    """Built on the meta device (no memory): GPT-2 at Transformer-XL base shapes, Marian at transformer_iwslt_de_en."""
    from _models import clm_config, count_parameters, translation_config
    from transformers import GPT2LMHeadModel, MarianMTModel

    _, clm_data, _, _ = parse_experiment(CONFIGS / "experiments" / "paper" / "clm_adamp.yaml")
    lm = clm_config("paper", 32000, clm_data.block_size)
    assert (lm.n_layer, lm.n_embd, lm.n_head, lm.n_inner, lm.activation_function) == (16, 410, 10, 2100, "relu")
    d, inner, layers, vocab, block = 410, 2100, 16, 32000, 512
    per_layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
    assert count_parameters(GPT2LMHeadModel, lm) == vocab * d + block * d + layers * per_layer + 2 * d  # 51.7M

    mt = translation_config("paper", 10000, 130)
    assert (mt.encoder_layers, mt.decoder_layers, mt.d_model, mt.encoder_ffn_dim, mt.encoder_attention_heads,
            mt.dropout, mt.scale_embedding) == (6, 6, 512, 1024, 4, 0.3, True)  # fmt: skip
    d, ffn = 512, 1024
    attn, ffn_params, norm = 4 * (d * d + d), (d * ffn + ffn) + (ffn * d + d), 2 * d
    encoder, decoder = 6 * (attn + ffn_params + 2 * norm), 6 * (2 * attn + ffn_params + 3 * norm)
    assert count_parameters(MarianMTModel, mt) == 10000 * d + encoder + decoder  # 36.7M, shared embeddings


@pytest.mark.slow
@needs_wikitext
@needs_multi30k
@pytest.mark.parametrize("path", CPU_CONFIGS, ids=lambda p: p.stem)
def test_cpu_config_trains_two_steps(path, tmp_path):
    """The CPU-scale config as written, with local data instead of the hub and a 2-step budget."""
    small = ["--output_dir", str(tmp_path), "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no",
             "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", *QUIET]  # fmt: skip
    if path.stem.startswith("clm"):
        metrics = run_clm([str(path), *clm_data_args(train_lines=150, eval_lines=40), *small])
        assert metrics["perplexity"] > 1
    else:
        metrics = run_translation([str(path), *translation_data_args(train_pairs=60, eval_pairs=4), *small])
        assert 0 <= metrics["eval_bleu"] <= 100
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 2


# ----- accelerate and DeepSpeed -----
@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.stem)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes == 8 and not config.use_cpu
    kind = str(config.distributed_type)
    if path.stem == "ddp":
        assert kind.endswith("MULTI_GPU")
    elif path.stem == "fsdp2":
        assert kind.endswith("FSDP") and config.fsdp_config["fsdp_version"] == 2
    else:
        assert kind.endswith("DEEPSPEED")
        ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]  # relative to the repo root
        assert ds_file == CONFIGS / "deepspeed" / f"{path.stem.removeprefix('deepspeed_')}.json"
        assert ds_file.is_file()


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.stem)
def test_deepspeed_json_lets_the_trainer_choose_the_optimizer(path):
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin

    config = json.loads(path.read_text())
    assert "optimizer" not in config and "scheduler" not in config  # else --optim is silently ignored
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_clipping"] == "auto"
    offload = "offload_optimizer" in config["zero_optimization"]
    assert offload == path.stem.endswith("_offload")
    if offload:  # keep our optimizer instead of DeepSpeedCPUAdam
        assert config["zero_force_ds_cpu_optimizer"] is False
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    assert plugin.zero_stage == int(path.stem[4])


@pytest.fixture
def one_rank():
    """A one-process DeepSpeed launch on CPU; environment and accelerate state restored afterwards."""
    pytest.importorskip("deepspeed")
    saved = dict(os.environ)
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    yield
    from accelerate.state import AcceleratorState, PartialState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    os.environ.clear()
    os.environ.update(saved)
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


@pytest.mark.slow
@needs_wikitext
@pytest.mark.parametrize(
    "ds_json, optim", [("zero2", "adamw_torch"), ("zero3", "adamw_torch"), ("zero2_offload", "radam")]
)
def test_deepspeed_config_runs_with_the_trainer(one_rank, monkeypatch, tmp_path, ds_json, optim):
    """The checked-in JSON drives a real Trainer + DeepSpeed run, with the optimizer --optim asked for."""
    import transformers
    from transformers import TrainerCallback

    from hf_adamp.integrations.deepspeed import innermost_optimizer

    seen = {}

    class RecordOptimizer(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen["optimizer"] = type(innermost_optimizer(optimizer)).__name__
            seen["deepspeed"] = type(kwargs["model"]).__name__

    init = transformers.Trainer.__init__

    def init_with_recorder(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(RecordOptimizer())

    monkeypatch.setattr(transformers.Trainer, "__init__", init_with_recorder)
    run_clm(["--output_dir", str(tmp_path), "--deepspeed", str(CONFIGS / "deepspeed" / f"{ds_json}.json"),
             "--optim", optim, "--max_steps", "2", "--save_strategy", "no", "--per_device_train_batch_size", "2",
             *clm_data_args(train_lines=100, eval_lines=0), *QUIET])  # fmt: skip
    assert seen["optimizer"] == {"adamw_torch": "AdamW", "radam": "RAdam"}[optim]
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.slow
@needs_wikitext
def test_adamp_with_deepspeed_stage0_and_zero2(one_rank, tmp_path):
    """AdamP runs under DeepSpeed ZeRO stage 0 (full parameters) and under the checked-in ZeRO-2 JSON (flat
    partitions, mapped back to parameter rows by the layout hf_adamp attaches at prepare time)."""
    stage0 = json.loads((CONFIGS / "deepspeed" / "zero2.json").read_text())
    stage0["zero_optimization"] = {"stage": 0}
    common = ["--optim", "adamp", "--max_steps", "2", "--save_strategy", "no", "--per_device_train_batch_size", "2",
              *clm_data_args(train_lines=100, eval_lines=0), *QUIET]  # fmt: skip
    for name, config in (("zero0", json.dumps(stage0)), ("zero2", str(CONFIGS / "deepspeed" / "zero2.json"))):
        run_clm(["--output_dir", str(tmp_path / name), "--deepspeed", config, *common])
        assert json.loads((tmp_path / name / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.slow
@needs_wikitext
def test_ddp_on_two_cpu_ranks_matches_one_process(tmp_path):
    """run_clm.py under DDP on 2 CPU ranks (torchrun + --use_cpu, gloo) trains AdamP exactly like one process
    with the same global batch: DDP hands every rank full parameters and averaged gradients. This is the
    Trainer path configs/accelerate/ddp.yaml takes on GPUs. `accelerate launch --cpu --num_processes 2` is
    not used: with that config (or a MULTI_CPU one) accelerate 1.15 silently starts ONE process here.
    Sequential sampling and no dropout make the two runs see the same numbers."""
    import subprocess
    import sys

    common = ["--optim", "adamp", "--learning_rate", "1e-2", "--weight_decay", "0.1", "--max_steps", "3",
              "--train_sampling_strategy", "sequential", "--config_overrides", "resid_pdrop=0.0,embd_pdrop=0.0",
              "--logging_steps", "1", "--save_strategy", "no", *clm_data_args(train_lines=100, eval_lines=0),
              *QUIET]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
              str(ROOT / "examples" / "run_clm.py"), "--use_cpu", "true", "--output_dir", str(tmp_path / "ddp"),
              "--per_device_train_batch_size", "2", *common]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_clm(["--output_dir", str(tmp_path / "single"), "--per_device_train_batch_size", "4", *common])

    def run(name):
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        return state["train_batch_size"], [e["loss"] for e in state["log_history"] if "loss" in e]

    (ddp_batch, ddp_losses), (single_batch, single_losses) = run("ddp"), run("single")
    assert (ddp_batch, single_batch) == (2, 4)
    assert len(ddp_losses) == 3 and ddp_losses == pytest.approx(single_losses, rel=1e-5)


@pytest.mark.slow
@needs_wikitext
def test_zero2_json_on_two_cpu_ranks_matches_one_process(tmp_path):
    """configs/deepspeed/zero2.json on 2 CPU ranks through Trainer + DeepSpeed (torchrun, gloo) gives the losses
    of one process without DeepSpeed at the same global batch, with AdamP on a weight-normalised model (so the
    projection is taken on the sharded rows)."""
    import subprocess
    import sys

    launcher = tmp_path / "gloo_launch.py"
    launcher.write_text(GLOO_LAUNCHER)
    common = ["--optim", "adamp", "--weight_norm", "--learning_rate", "1e-2", "--weight_decay", "0.1",
              "--max_steps", "3", "--train_sampling_strategy", "sequential",
              "--config_overrides", "resid_pdrop=0.0,embd_pdrop=0.0", "--logging_steps", "1", "--save_strategy", "no",
              *clm_data_args(train_lines=100, eval_lines=0), *QUIET]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
              str(launcher), str(ROOT / "examples" / "run_clm.py"),
              "--deepspeed", str(CONFIGS / "deepspeed" / "zero2.json"), "--output_dir", str(tmp_path / "zero2"),
              "--per_device_train_batch_size", "2", *common]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_clm(["--output_dir", str(tmp_path / "single"), "--per_device_train_batch_size", "4", *common])

    def losses(name):
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        return [e["loss"] for e in state["log_history"] if "loss" in e]

    assert len(losses("zero2")) == 3 and losses("zero2") == pytest.approx(losses("single"), rel=1e-5)


@pytest.mark.slow
@needs_wikitext
@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3_offload"])
def test_accelerate_deepspeed_config_reaches_the_trainer(tmp_path, name):
    """`accelerate launch --config_file configs/accelerate/<name>.yaml` (one CPU process) makes the Trainer train
    under the DeepSpeed JSON it names: the checkpoint is DeepSpeed's, written by that ZeRO stage and config."""
    import subprocess
    import sys

    import torch

    pytest.importorskip("deepspeed")
    config = CONFIGS / "accelerate" / f"{name}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
           "--main_process_port", str(free_port()), str(ROOT / "examples" / "run_clm.py"),
           "--output_dir", str(tmp_path), "--optim", "radam", "--max_steps", "2", "--save_steps", "2",
           "--per_device_train_batch_size", "2",
           *clm_data_args(train_lines=100, eval_lines=0), *QUIET]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # paths from the root
    assert result.returncode == 0, result.stderr[-3000:]
    states = tmp_path / "checkpoint-2" / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    saved = torch.load(states, weights_only=False)["ds_config"]
    expected = json.loads((CONFIGS / "deepspeed" / f"{name.removeprefix('deepspeed_')}.json").read_text())
    assert saved["zero_optimization"]["stage"] == expected["zero_optimization"]["stage"]
    assert saved.get("zero_force_ds_cpu_optimizer", True) == expected.get("zero_force_ds_cpu_optimizer", True)
    assert ("offload_optimizer" in saved["zero_optimization"]) == name.endswith("_offload")
