"""Backend selection (``fused=``, ``foreach=``, the environment) and the per-parameter memory of outcomes."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import forced_grad, make_params
from test_fused import SHARD_SHAPES, shard

import hf_adamp
from hf_adamp import kernels, projection
from hf_adamp.optim import _step
from hf_adamp.optim.backends import KernelsUnavailableError
from hf_adamp.sharding import Layout
from hf_adamp.sharding.layout import merge_runs

SHAPES = [(6, 5), (5,), (3, 4, 2)]
OPTIMIZERS = [("AdamP", dict(lr=1e-2, weight_decay=0.1)), ("SGDP", dict(lr=0.1, momentum=0.9, weight_decay=0.1))]


def has_compiler() -> bool:
    return kernels._compiler() is not None


def backends_used(opt) -> list[str]:
    (ctx,) = opt._contexts.values()
    return [backend.name for backend, _ in ctx.batches]


def stepped(name, kwargs, steps=3, seed=0, **flags):
    params = [p.requires_grad_() for p in make_params(SHAPES, seed=seed)]
    opt = getattr(hf_adamp, name)(params, **kwargs, **flags)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = forced_grad(p.detach(), ("channel", "none", "layer")[step % 3], gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_fused_and_foreach_cannot_both_be_true(name, kwargs):
    params = make_params(SHAPES)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together."):
        torch.optim.AdamW(params, fused=True, foreach=True)  # torch's words, which ours repeat
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together."):
        getattr(hf_adamp, name)(params, **kwargs, fused=True, foreach=True)
    with pytest.raises(TypeError, match="Invalid fused"):
        getattr(hf_adamp, name)(params, **kwargs, fused="yes")


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_default_and_flags_choose_the_backend(name, kwargs, monkeypatch):
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    _, opt = stepped(name, kwargs, steps=1, foreach=False)
    assert backends_used(opt) == ["reference"]
    _, opt = stepped(name, kwargs, steps=1, fused=False)
    assert backends_used(opt) == ["eager"]
    _, opt = stepped(name, kwargs, steps=1, foreach=False, fused=False)
    assert backends_used(opt) == ["reference"]
    if has_compiler():
        _, opt = stepped(name, kwargs, steps=1)
        assert backends_used(opt) == ["cpu"]
        _, opt = stepped(name, kwargs, steps=1, fused=True, foreach=False)  # fused wins, as in torch
        assert backends_used(opt) == ["cpu"]
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    _, opt = stepped(name, kwargs, steps=1)
    assert backends_used(opt) == ["eager"]


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_fused_false_is_the_eager_path(name, kwargs, monkeypatch):
    """fused=False steps exactly as the kernels switched off by the environment: the eager backend."""
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    ours, _ = stepped(name, kwargs, steps=4, fused=False)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    eager, _ = stepped(name, kwargs, steps=4)
    for a, b in zip(ours, eager, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_fused_true_raises_where_the_kernels_are_missing(name, kwargs, monkeypatch):
    """A missing compiler: fused=None falls back to eager (logged by the kernels), fused=True raises."""
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failed", None)
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    _, opt = stepped(name, kwargs, steps=1)
    assert backends_used(opt) == ["eager"]
    with pytest.raises(KernelsUnavailableError, match="fused=True.*no C\\+\\+ compiler found"):
        stepped(name, kwargs, steps=1, fused=True)
    assert issubclass(KernelsUnavailableError, RuntimeError)  # what torch raises for fused=True without support


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_fused_true_with_the_kernels_switched_off_raises(name, kwargs, monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    with pytest.raises(KernelsUnavailableError, match=f"{kernels.DISABLE_ENV}=1 is set"):
        stepped(name, kwargs, steps=1, fused=True)


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_state_dict_round_trips_the_flag(name, kwargs):
    _, opt = stepped(name, kwargs, steps=1, fused=False)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["fused"] is False
    params = [p.requires_grad_() for p in make_params(SHAPES)]
    fresh = getattr(hf_adamp, name)(params, **kwargs)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["fused"] is False
    for p in params:
        p.grad = torch.randn_like(p)
    fresh.step()
    assert backends_used(fresh) == ["eager"]
    old = copy.deepcopy(saved)  # a checkpoint from before the flag existed
    for group in old["param_groups"]:
        del group["fused"]
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["fused"] is None


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
def test_every_backend_writes_the_same_memory(name, kwargs, monkeypatch):
    """last_projection: one entry per parameter (a list of one int for an unsharded one), the same whichever
    backend stepped it; none for parameters that are never projected."""
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    flags = [dict(foreach=False), dict(fused=False)] + ([dict()] if has_compiler() else [])
    memories = []
    for f in flags:
        params, opt = stepped(name, kwargs, steps=3, **f)
        memories.append([opt.state[p].get(_step.MEMORY_KEY) for p in params])
    assert memories[0][1] is None
    channel, none, layer = projection.CHANNEL, projection.NONE, projection.LAYER
    # steps: channel, none, layer
    assert memories[0][0] == [layer + 3 * none] and memories[0][2] == [layer + 3 * none]
    assert all(m == memories[0] for m in memories), memories
    assert channel != none


def _one_rank_flat(name, kwargs, state=None):
    """All of SHARD_SHAPES in one flat tensor under a layout (one rank, no reducer)."""
    ((lo, hi, specs, pieces),), _ = shard(SHARD_SHAPES, [])
    full = torch.cat([p.reshape(-1) for p in make_params(SHARD_SHAPES, seed=7)])
    local = full[lo:hi].clone().requires_grad_()
    opt = getattr(hf_adamp, name)([local], **kwargs)
    opt.attach_layout(Layout(specs, {id(local): pieces}))
    if state is not None:
        opt.load_state_dict(state)
    return local, opt, specs


def _step_flat(local, opt, specs, step):
    gen = torch.Generator().manual_seed(step)
    flat_params = local.detach().split([s.numel for s in specs])
    grads = [forced_grad(p.reshape(s.shape), "channel", gen).reshape(-1) for p, s in zip(flat_params, specs)]
    local.grad = torch.cat(grads)
    opt.step()


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS)
@pytest.mark.parametrize("fused", [None, False])
def test_memory_of_an_older_checkpoint_loads_and_steps(name, kwargs, fused, monkeypatch):
    """A checkpoint written when the memory was kept per C++ run (one entry per run of the tensor, element-wise
    runs included) loads and steps exactly like the same checkpoint in today's form, one entry per slot."""
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    kwargs = dict(kwargs, fused=fused)
    local, opt, specs = _one_rank_flat(name, kwargs)
    for step in range(2):
        _step_flat(local, opt, specs, step)
    saved = copy.deepcopy(opt.state_dict())
    memory = saved["state"][0][_step.MEMORY_KEY]
    projectable = [j for j, s in enumerate(specs) if s.rows]
    assert memory == [projection.CHANNEL * 4] * len(projectable)  # channel twice, per slot

    (ctx,) = opt._contexts.values()
    (item,) = ctx.items
    runs = merge_runs(item.segments)
    old = copy.deepcopy(saved)
    old["state"][0][_step.MEMORY_KEY] = [memory[item.slots.index(r.slot)] if r.slot >= 0 else 0 for r in runs]
    assert len(old["state"][0][_step.MEMORY_KEY]) > len(memory)  # per run, the 1-D parameters' runs included

    results = []
    for state in (saved, old):
        resumed, ropt, _ = _one_rank_flat(name, kwargs, state)
        resumed.data.copy_(local.detach())
        _step_flat(resumed, ropt, specs, 2)
        results.append((resumed.detach().clone(), ropt.state[resumed][_step.MEMORY_KEY]))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1] == memory  # the old form's history was read, not lost


def test_device_memory_is_updated_in_place():
    """On accelerators the memory of all tensors is one device tensor, updated without a host read; the states
    hold views of it. Checked here on CPU tensors through the same code."""
    from hf_adamp.optim._engine import ProjectedOptimizer, StepContext

    items = [
        _step.Item(torch.zeros(2, 2), torch.zeros(2, 2), {}, {}, [], slots=(0,)),
        _step.Item(torch.zeros(4), torch.zeros(4), {_step.MEMORY_KEY: [projection.LAYER]}, {}, [], slots=(2, 1)),
    ]
    items[1].state[_step.MEMORY_KEY] = [projection.LAYER, projection.CHANNEL]
    ctx = StepContext.__new__(StepContext)
    ctx.remembering, ctx.memory, ctx.device = items, None, torch.device("cpu")
    ProjectedOptimizer._device_memory(ctx)
    views = [item.state[_step.MEMORY_KEY] for item in items]
    assert [v.tolist() for v in views] == [[0], [projection.LAYER, projection.CHANNEL]]
    kind = torch.tensor([projection.CHANNEL, projection.NONE, projection.LAYER], dtype=torch.int8)
    newest = kind.index_select(0, ctx.memory_slots).to(ctx.memory.dtype)
    ctx.memory.copy_(newest + ctx.memory.remainder(3) * 3)
    assert [v.tolist() for v in views] == [
        [projection.CHANNEL],
        [projection.LAYER + 3 * projection.LAYER, projection.NONE + 3 * projection.CHANNEL],
    ]
