"""``python -m hf_adamp``: an unmodified stock-style script (tests/scripts/stock_style_clm.py, which imports
nothing of hf_adamp) trains with ``--optim adamp``, with and without weight norm, also under torchrun."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from _dist_helpers import GLOO_LAUNCHER, free_port

from hf_adamp import launch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "stock_style_clm.py"
WORDS = [f"w{i}" for i in range(40)]
LLAMA = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=2"
WRAPPED = 14  # q, k, v, o, gate, up, down in each of the 2 layers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(training text, tokenizer folder): a word-level tokenizer over 40 words, made here, no hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    text = folder / "train.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(60)) + "\n")
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<pad>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    fast.save_pretrained(folder / "tokenizer")
    return text, folder / "tokenizer"


def script_args(corpus: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    text, tokenizer = corpus
    return [
        str(SCRIPT),
        "--model_type=llama",
        f"--config_overrides={LLAMA},vocab_size={len(WORDS) + 3}",
        f"--tokenizer_name={tokenizer}",
        f"--train_file={text}",
        f"--output_dir={out}",
        "--do_train",
        "--optim=adamp",
        "--max_steps=4",
        "--per_device_train_batch_size=4",
        "--learning_rate=1e-2",
        "--weight_decay=0.1",
        "--lr_scheduler_type=constant",
        "--logging_steps=1",
        "--save_steps=2",
        "--use_cpu",
        "--report_to=none",
        "--disable_tqdm=true",
        "--seed=0",
        *extra,
    ]


def run(command: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    for name in (launch.ENV_WEIGHT_NORM, launch.ENV_LOG_PROJECTION):
        full_env.setdefault(name, "0")
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def projection_logs(out: Path) -> list[dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


# ----- the script alone cannot take --optim adamp; through the launcher it can -----
def test_unmodified_script_refuses_adamp_without_the_launcher(corpus, tmp_path) -> None:
    proc = run([sys.executable, *script_args(corpus, tmp_path / "out")])
    assert proc.returncode != 0 and "invalid choice: 'adamp'" in proc.stderr


def test_launcher_runs_our_optimizer(corpus, tmp_path) -> None:
    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "hf_adamp", "--log-projection", *script_args(corpus, out)])
    check_ok(proc)
    logs = projection_logs(out)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    matrices = 2 * 7 + 2  # the projections, the embedding and the LM head
    for entry in logs:  # only an hf_adamp optimizer reports these
        assert entry["projection/channel"] + entry["projection/layer"] + entry["projection/none"] == matrices
    assert "weight norm" not in proc.stdout
    keys = safetensors.torch.load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in keys


def test_launcher_weight_norm_projects_exports_plain_weights_and_resumes_exactly(corpus, tmp_path) -> None:
    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "hf_adamp", "--weight-norm", "--log-projection", *script_args(corpus, out)])
    check_ok(proc)
    assert proc.stdout.count("hf_adamp: weight norm (llama): 14 modules wrapped") == 1, proc.stdout
    for entry in projection_logs(out):  # v of every wrapped projection is scale-invariant: channel view
        assert entry["projection/channel"] >= WRAPPED, entry
    final = safetensors.torch.load_file(out / "model.safetensors")
    assert "model.layers.1.mlp.down_proj.weight" in final and not [k for k in final if "parametrizations" in k]
    assert (out / "checkpoint-2" / "weight_norm_state.safetensors").is_file()

    # resume from step 2 through the environment variables: the same weights, bit for bit
    resumed = tmp_path / "resumed"
    extra = [f"--resume_from_checkpoint={out / 'checkpoint-2'}"]
    env = {launch.ENV_WEIGHT_NORM: "1", launch.ENV_LOG_PROJECTION: "1"}
    check_ok(run([sys.executable, "-m", "hf_adamp", *script_args(corpus, resumed, *extra)], env=env))
    again = safetensors.torch.load_file(resumed / "model.safetensors")
    assert again.keys() == final.keys()
    for key, value in final.items():
        assert torch.equal(again[key], value), key


def test_torchrun_two_ranks(corpus, tmp_path) -> None:
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command = [*torchrun, "-m", "hf_adamp", "--weight-norm", "--log-projection", *script_args(corpus, out)]
    proc = run([*command, "--log_level=info"], env={"TORCH_CPP_LOG_LEVEL": "ERROR"})
    check_ok(proc)
    assert proc.stdout.count("modules wrapped") == 1, proc.stdout  # printed by rank 0 only
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in proc.stdout + proc.stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    for entry in projection_logs(out):
        assert entry["projection/channel"] >= WRAPPED, entry


# ----- the launcher itself -----
def test_errors_keep_traceback_and_exit_status(tmp_path) -> None:
    failing = tmp_path / "failing.py"
    lines = ["import sys", "if sys.argv[1:] == ['exit']:", "    sys.exit(3)", "raise ValueError('boom ' + __name__)"]
    failing.write_text("\n".join(lines) + "\n")
    proc = run([sys.executable, "-m", "hf_adamp", str(failing), "raise"], timeout=120)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and 'failing.py", line 4' in proc.stderr
    assert "ValueError: boom __main__" in proc.stderr
    assert run([sys.executable, "-m", "hf_adamp", str(failing), "exit"], timeout=120).returncode == 3


def test_parse_args(tmp_path, monkeypatch) -> None:
    script = tmp_path / "train.py"
    script.write_text("")
    for name in (launch.ENV_WEIGHT_NORM, launch.ENV_WEIGHT_NORM_EXCLUDE, launch.ENV_LOG_PROJECTION):
        monkeypatch.delenv(name, raising=False)
    opts = launch.parse_args(
        ["--weight-norm", "--weight-norm-exclude", "mlp", "--local-rank=1", str(script), "--weight-norm", "-x"]
    )
    assert opts.weight_norm and opts.weight_norm_exclude == ("mlp",) and not opts.log_projection
    assert opts.script == str(script)
    assert opts.script_args == ["--local-rank=1", "--weight-norm", "-x"]  # the rest is the script's
    assert launch.parse_args(["--", str(script)]).weight_norm is False

    monkeypatch.setenv(launch.ENV_WEIGHT_NORM, "1")
    monkeypatch.setenv(launch.ENV_WEIGHT_NORM_EXCLUDE, "o_proj|down_proj")
    opts = launch.parse_args([str(script)])
    assert opts.weight_norm and opts.weight_norm_exclude == ("o_proj|down_proj",)
    monkeypatch.setenv(launch.ENV_WEIGHT_NORM, "maybe")
    with pytest.raises(SystemExit, match="is not a boolean"):
        launch.parse_args([str(script)])
    monkeypatch.delenv(launch.ENV_WEIGHT_NORM)
    monkeypatch.delenv(launch.ENV_WEIGHT_NORM_EXCLUDE)
    for bad in ([], ["--weight-norm"], [str(tmp_path / "missing.py")], ["--weight-norm-exclude", "x", str(script)]):
        with pytest.raises(SystemExit):
            launch.parse_args(bad)


def test_console_script_entry_point() -> None:
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["hf-adamp-run"].partition(":")
    assert module == "hf_adamp.launch" and callable(getattr(launch, attr))


def test_accelerate_launch_module(corpus, tmp_path) -> None:
    out = tmp_path / "out"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--num_machines=1"]
    accelerate += ["--mixed_precision=no", "--dynamo_backend=no", "--cpu"]
    command = [*accelerate, "-m", "hf_adamp", "--weight-norm", "--log-projection", *script_args(corpus, out)]
    check_ok(run(command))
    for entry in projection_logs(out):
        assert entry["projection/channel"] >= WRAPPED, entry


# ----- weight norm for a plain accelerate loop, whose optimizer is built before prepare -----
@pytest.fixture
def launched_weight_norm():
    from hf_adamp.integrations import launch_hooks

    launch_hooks.enable_weight_norm(exclude="o_proj")
    yield launch_hooks
    launch_hooks.disable()


def test_prepare_swaps_the_wrapped_weights_into_an_earlier_optimizer(launched_weight_norm, capsys) -> None:
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_adamp

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=43)
    config.update_from_string(LLAMA)
    model = LlamaForCausalLM(config)
    groups = hf_adamp.integrations.trainer_param_groups(model, weight_decay=0.1)
    optimizer = hf_adamp.AdamP(groups, lr=1e-2)
    model, optimizer = Accelerator(cpu=True).prepare(model, optimizer)
    assert "12 modules wrapped" in capsys.readouterr().out  # o_proj excluded

    params = dict(model.named_parameters())
    decay, no_decay = ({id(p) for p in g["params"]} for g in optimizer.optimizer.param_groups)
    assert {id(p) for p in params.values()} == decay | no_decay  # every parameter, the plain weights gone
    assert id(params["model.layers.0.mlp.up_proj.parametrizations.weight.original1"]) in decay
    assert id(params["model.layers.0.mlp.up_proj.parametrizations.weight.original0"]) in no_decay
    assert id(params["model.layers.0.self_attn.o_proj.weight"]) in decay

    ids = torch.randint(0, 43, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    decisions = optimizer.optimizer.projection_decisions()
    assert decisions[params["model.layers.1.mlp.down_proj.parametrizations.weight.original1"]] == "channel"


# ----- ZeRO-3: transformers builds the model under zero.Init; weight norm gathers, wraps, re-partitions -----


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_ranks_with_weight_norm_equals_one_process(corpus, tmp_path) -> None:
    """Trainer + DeepSpeed ZeRO-3 (model built under zero.Init by from_pretrained) + --weight-norm + adamp on 2
    CPU ranks trains the same weights as one process without DeepSpeed, at the same global batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 3)
    config.update_from_string(LLAMA)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "start")  # both runs load these weights
    ds_config = tmp_path / "zero3.json"
    zero = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    auto = {k: "auto" for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")}
    ds_config.write_text(json.dumps({**auto, "gradient_clipping": "auto", "zero_optimization": zero}))
    wrapper = tmp_path / "gloo_launch.py"
    wrapper.write_text(GLOO_LAUNCHER)

    def args(out: Path, *extra: str) -> list[str]:
        common = script_args(corpus, out, f"--model_name_or_path={tmp_path / 'start'}", "--max_steps=3")
        common = [a for a in common if not a.startswith(("--model_type", "--config_overrides", "--use_cpu"))]
        # adam_epsilon: Adam divides near-zero gradients by their own size, which turns the engines' different
        # summation orders into ~1e-5 after 3 steps at eps=1e-8 (the same with AdamW); 1e-6 damps that
        return [*common, "--train_sampling_strategy=sequential", "--save_strategy=no", "--adam_epsilon=1e-6", *extra]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    zero3 = [
        *torchrun,
        str(wrapper),
        str(ROOT / "hf_adamp" / "__main__.py"),
        "--weight-norm",
        "--log-projection",
        *args(tmp_path / "zero3"),
    ]
    zero3 += [f"--deepspeed={ds_config}"]
    proc = run(zero3 + ["--per_device_train_batch_size=2"], env={"DS_ACCELERATOR": "cpu"}, timeout=600)
    check_ok(proc)
    # the model was built under zero.Init: each weight was gathered, wrapped and re-partitioned
    assert (
        proc.stdout.count("wrapped  model.layers.0.self_attn.q_proj  [Linear, v [out, in], norm per row; ZeRO-3") == 1
    )
    for entry in projection_logs(tmp_path / "zero3"):  # AdamP projected v on ZeRO-3's partitions
        assert entry["projection/channel"] >= WRAPPED, entry
    single = [sys.executable, "-m", "hf_adamp", "--weight-norm", *args(tmp_path / "one", "--use_cpu")]
    check_ok(run(single))

    sharded = safetensors.torch.load_file(tmp_path / "zero3" / "model.safetensors")
    reference = safetensors.torch.load_file(tmp_path / "one" / "model.safetensors")
    assert sharded.keys() == reference.keys() and "model.layers.0.mlp.up_proj.weight" in reference
    start = safetensors.torch.load_file(tmp_path / "start" / "model.safetensors")
    assert not torch.allclose(
        reference["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"]
    )
    for key, value in reference.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=2e-5, msg=key)
    print("ZeRO-3 vs one process: max abs diff", max((sharded[k] - v).abs().max().item() for k, v in reference.items()))


def test_weight_norm_errors_name_the_launcher_options(launched_weight_norm) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))  # no config.model_type: no family rule applies
    with pytest.raises(
        ValueError, match=r"(?s)hf_adamp --weight-norm: .*no config.model_type.*--weight-norm-include REGEX"
    ):
        launched_weight_norm.weight_norm_model(model)


def test_an_optimizer_that_already_stepped_is_refused(launched_weight_norm) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=43)
    config.update_from_string(LLAMA)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 43, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    launched_weight_norm.weight_norm_model(model)
    with pytest.raises(RuntimeError, match="AdamW has already stepped on a weight that weight norm replaced"):
        launched_weight_norm.swap_wrapped_weights(optimizer)
