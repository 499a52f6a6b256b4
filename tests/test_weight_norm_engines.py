"""Weight norm under torch.compile, DeepSpeed ZeRO-2/3 and FSDP2 (CPU, gloo).

The distributed cases run this file as a worker script on 2 ranks (``python <this file> <mode> <out>``);
rank 0 also trains a single-process reference and writes the comparison to ``<out>/result.pt``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the worker processes
from test_weight_norm_helpers import FAMILIES, logits  # noqa: E402

import hf_adamp  # noqa: E402

FAMILY = FAMILIES["gpt2"]  # Conv1D with v stored [out, in]: the custom parametrization is the riskier one
LR, STEPS = 1e-2, 3


def _grads(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_torch_compile_matches_eager(family: str) -> None:
    """aot_eager traces the parametrizations through dynamo and AOTAutograd, forward and backward."""
    fam = FAMILIES[family]
    model, inputs = fam.build(), fam.inputs()
    hf_adamp.apply_weight_norm(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(logits(compiled, inputs), logits(model, inputs))
    eager, traced = _grads(model, inputs), _grads(compiled, inputs)
    assert eager.keys() == {k.removeprefix("_orig_mod.") for k in traced}
    for name, grad in traced.items():
        torch.testing.assert_close(grad, eager[name.removeprefix("_orig_mod.")])


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager() -> None:
    model, inputs = FAMILY.build(), FAMILY.inputs()
    hf_adamp.apply_weight_norm(model)
    torch.testing.assert_close(logits(torch.compile(model), inputs), logits(model, inputs))


# ----- distributed workers -----
def _reference(steps: int) -> torch.nn.Module:
    """Single process: the wrapped model trained with AdamW on the full batches."""
    model = FAMILY.build()
    hf_adamp.apply_weight_norm(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for step in range(steps):
        opt.zero_grad()
        batch = FAMILY.inputs(seed=step, batch=4)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    return model.eval()


def _local(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}


def _deepspeed_worker(stage: int, out: Path) -> None:
    import deepspeed

    rank = int(os.environ["RANK"])
    model = FAMILY.build()
    hf_adamp.apply_weight_norm(model)
    config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
        "zero_optimization": {"stage": stage},
    }
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    for step in range(STEPS):
        batch = _local(FAMILY.inputs(seed=step, batch=4), rank)
        engine.backward(engine(**batch, labels=batch["input_ids"]).loss)
        engine.step()
    engine.eval()
    inputs = FAMILY.inputs()
    live = logits(engine, inputs)  # ZeRO-3 gathers g and v for the forward
    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; full tensors on rank 0
    else:
        state = engine.module.state_dict()
    if rank == 0:
        plain = hf_adamp.weight_norm_state_dict(engine.module, state)
        vanilla = FAMILY.build(seed=5)
        vanilla.load_state_dict(plain)
        ref = logits(_reference(STEPS), inputs)
        torch.save({"live": live, "export": logits(vanilla, inputs), "ref": ref}, out / "result.pt")


def _fsdp2_worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs = FAMILY.inputs()

    def sharded() -> torch.nn.Module:
        model = FAMILY.build()
        hf_adamp.apply_weight_norm(model)
        for block in model.transformer.h:
            fully_shard(block)
        return fully_shard(model)

    plain = FAMILY.build()
    hf_adamp.apply_weight_norm(plain)
    before, sharded_before = logits(plain, inputs), logits(sharded(), inputs)
    # A separate model trains: on CPU/gloo a no_grad forward before the first step makes FSDP2's training
    # differ from one process (seen with and without weight norm).
    model = sharded()
    v = model.transformer.h[0].mlp.c_fc.parametrizations.weight.original1
    assert v.to_local().shape[0] == 32  # v [64, 16] sharded by output rows: 32 each
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for step in range(STEPS):
        opt.zero_grad()
        batch = _local(FAMILY.inputs(seed=step, batch=4), rank)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    after = logits(model.eval(), inputs)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        vanilla = FAMILY.build(seed=5)
        vanilla.load_state_dict(hf_adamp.weight_norm_state_dict(model, full))
        result = {"before": before, "sharded_before": sharded_before, "live": after}
        result |= {"export": logits(vanilla, inputs), "ref": logits(_reference(STEPS), inputs)}
        torch.save(result, out / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, out: Path, world: int = 2) -> dict[str, torch.Tensor]:
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(Path.cwd()),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, mode, str(out)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=540)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return torch.load(out / "result.pt")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_ranks_trains_like_one_process(stage: int, tmp_path) -> None:
    result = _launch(f"deepspeed{stage}", tmp_path)
    torch.testing.assert_close(result["live"], result["ref"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result["export"], result["live"])


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_two_ranks_forward_training_and_export(tmp_path) -> None:
    result = _launch("fsdp2", tmp_path)
    torch.testing.assert_close(result["sharded_before"], result["before"])
    torch.testing.assert_close(result["live"], result["ref"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result["export"], result["live"])


_ZERO_INIT = """
import deepspeed, hf_adamp, transformers as T
# import the model class (and, through it, torch._dynamo) before zero.Init patches tensor creation:
# torch._dynamo fails to import under that patch, with or without hf_adamp
T.LlamaForCausalLM
config = {"train_batch_size": 1, "zero_optimization": {"stage": 3}}
with deepspeed.zero.Init(config_dict_or_path=config):
    model = T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=24,
                               num_attention_heads=2, vocab_size=40))
names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
before = {}
for name in names:
    weight = model.get_submodule(name).weight
    with deepspeed.zero.GatheredParameters([weight]):
        before[name] = weight.detach().clone()
print(hf_adamp.apply_weight_norm(model))
for name in names:
    wrapped = model.get_submodule(name).parametrizations["weight"]
    g, v = wrapped.original0, wrapped.original1
    print(name, "partitioned:", hasattr(g, "ds_id") and hasattr(v, "ds_id") and v.data.numel() == 0)
    with deepspeed.zero.GatheredParameters([g, v]):
        print(name, "max diff:", (wrapped[0](g, v) - before[name]).abs().max().item())
"""


@pytest.mark.slow
def test_zero3_partitioned_model_is_gathered_wrapped_and_repartitioned(tmp_path) -> None:
    """DeepSpeed issue #1045: weight norm computed from a ZeRO-3-partitioned (empty) weight would be garbage, so
    each weight is gathered first; g and v are then partitioned too, and give back the weight."""
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        WORLD_SIZE="1",
        RANK="0",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        PYTHONPATH=str(Path.cwd()),
    )
    done = subprocess.run([sys.executable, "-c", _ZERO_INIT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weight norm (llama): 7 modules wrapped" in done.stdout
    assert "ZeRO-3: gathered, wrapped, re-partitioned" in done.stdout
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        assert f"{name} partitioned: True" in done.stdout
        diff = float(done.stdout.split(f"{name} max diff: ")[1].split()[0])
        assert diff < 1e-6, done.stdout


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    if mode.startswith("deepspeed"):
        _deepspeed_worker(int(mode.removeprefix("deepspeed")), out_dir)
        # DeepSpeed's CPU shared-memory comm op can abort in interpreter teardown ("terminate called without an
        # active exception") after all work is done; wait for every rank, then leave without that teardown
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        sys.stdout.flush()
        os._exit(0)
    else:
        _fsdp2_worker(out_dir)
