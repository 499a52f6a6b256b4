"""The step context (what a step learns about its tensors, reused while they stay the same) against rebuilding it
every step: bit-identical results whatever changes between steps, and nothing held past a step.

Every test runs on the fused CPU kernels and on the eager path (HF_ADAMP_DISABLE_FUSED=1).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import MODES, forced_grad, make_params

import hf_adamp
from hf_adamp import kernels

OPTIMIZERS = [
    ("AdamP", dict(lr=1e-2, weight_decay=0.1)),
    ("SGDP", dict(lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True)),
]


@pytest.fixture(params=["fused", "eager"])
def path(request, monkeypatch):
    if request.param == "eager":
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    else:
        monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
        if not kernels.available():
            pytest.skip("the fused kernels are unavailable here")
    return request.param


def _grads(ps, step, skip=None):
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(ps):
        p.grad = None if skip is not None and i == skip else forced_grad(p.detach(), MODES[(step + i) % 4], gen)


def _twin_runs(name, kwargs, steps, between):
    """Run two identical optimizers; ``between(step, ps, opt)`` mutates both alike before each step (it may return
    a new parameter list). The second forgets its contexts before every step, so it rebuilds them from scratch."""
    base = make_params(dtype=torch.float32, seed=3)
    runs = []
    for fresh in (False, True):
        ps = [p.clone().requires_grad_() for p in base]
        opt = getattr(hf_adamp, name)(ps, **kwargs)
        for step in range(steps):
            ps = between(step, ps, opt) or ps
            if fresh:
                opt._contexts.clear()
            opt.step()
        runs.append((ps, opt))
    return runs


def _assert_same(runs):
    (ps_a, opt_a), (ps_b, opt_b) = runs
    for a, b in zip(ps_a, ps_b, strict=True):
        assert torch.equal(a, b)
        for key, value in opt_b.state[b].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(opt_a.state[a][key], value), key
            else:
                assert opt_a.state[a][key] == value, key
    assert list(opt_a.projection_decisions().values()) == list(opt_b.projection_decisions().values())


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_context_is_reused_and_gives_the_bits_of_a_fresh_one(path, name, kwargs):
    def between(step, ps, opt):
        _grads(ps, step)

    runs = _twin_runs(name, kwargs, 12, between)
    _assert_same(runs)
    opt = runs[0][1]
    ctx = next(iter(opt._contexts.values()))
    assert ctx.reusable
    before = ctx
    _grads(runs[0][0], 99)
    opt.step()
    assert next(iter(opt._contexts.values())) is before, "an unchanged step must reuse its context"


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_hyperparameters_changed_between_steps(path, monkeypatch, name, kwargs):
    """A scheduler's lr, and every other hyperparameter, is read at every step."""

    def between(step, ps, opt):
        _grads(ps, step)
        group = opt.param_groups[0]
        group["lr"] = kwargs["lr"] * (0.5 + 0.1 * step)
        group["weight_decay"] = 0.05 * (step % 3)
        group["delta"] = (0.05, 0.1, 0.3)[step % 3]
        group["wd_ratio"] = (0.1, 0.5)[step % 2]
        group["maximize"] = step % 5 == 4
        group["eps"] = (1e-8, 1e-5)[step % 2]
        if name == "AdamP":
            group["betas"] = ((0.9, 0.999), (0.8, 0.99))[step % 2]
            group["nesterov"] = step % 2 == 1
        else:
            group["momentum"] = (0.9, 0.5)[step % 2]
            group["dampening"] = (0.0, 0.2)[step % 2] if not group["nesterov"] else 0.0

    runs = _twin_runs(name, kwargs, 14, between)
    _assert_same(runs)
    if path == "fused":  # and the kernels read them as the eager path does
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
        eager = _twin_runs(name, kwargs, 14, between)
        for a, b in zip(runs[0][0], eager[0][0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_gradients_that_come_and_go(path, name, kwargs):
    def between(step, ps, opt):
        _grads(ps, step, skip=step % 3 if step % 2 else None)

    _assert_same(_twin_runs(name, kwargs, 12, between))


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_new_storage_strides_and_gradient_layouts(path, name, kwargs):
    """``param.data`` swapped for new storage, a transposed gradient (copied into the weight's layout), a
    gradient of another dtype (a different path): each is seen at the step it happens."""

    def between(step, ps, opt):
        _grads(ps, step)
        if step == 3:
            for p in ps:
                p.data = p.data.clone()
        if step == 5:
            p = ps[1]
            p.grad = p.grad.t().contiguous().t()  # same values, column-major
        if step == 7:
            ps[2].grad = ps[2].grad.double().float()  # a new tensor, same dtype
        if step == 8:
            for p in ps:
                if p.dim() > 1:
                    p.grad = p.grad.contiguous(memory_format=torch.contiguous_format)

    _assert_same(_twin_runs(name, kwargs, 11, between))


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_param_groups_and_state_replaced(path, name, kwargs):
    """A group added, one narrowed (as ZeRO does), the state dict loaded into the same optimizer, a state tensor
    replaced by hand: the next step works on what is there now."""
    saved = {}

    def between(step, ps, opt):
        _grads(ps, step)
        if step == 2:
            extra = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
            opt.add_param_group({"params": [extra], "lr": 3e-3})
            ps = ps + [extra]
            _grads(ps, step)
            return ps
        if step == 4:
            saved["groups"] = opt.param_groups
            opt.param_groups = [opt.param_groups[0]]
            ps[-1].grad = None
        if step == 5:
            opt.param_groups = saved["groups"]
        if step == 6:
            saved["state"] = opt.state_dict()
        if step == 8:
            opt.load_state_dict(saved["state"])
        if step == 9:
            key = "exp_avg" if name == "AdamP" else "momentum"
            opt.state[ps[1]][key] = opt.state[ps[1]][key].clone() * 0.5
        return None

    _assert_same(_twin_runs(name, kwargs, 12, between))


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_gradients_are_not_held_after_the_step(path, name, kwargs):
    ps = [p.requires_grad_() for p in make_params(dtype=torch.float32, seed=4)]
    opt = getattr(hf_adamp, name)(ps, **kwargs)
    for step in range(3):
        _grads(ps, step)
        opt.step()
    refs = [weakref.ref(p.grad) for p in ps]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs), "a step context kept a gradient alive"
    assert opt._contexts, "the context itself is kept"


def test_switching_paths_between_steps(monkeypatch):
    """Turning the kernels off (or speculation) between steps takes effect at once, with the numbers unchanged."""
    if not kernels.available():
        pytest.skip("the fused kernels are unavailable here")
    name, kwargs = OPTIMIZERS[0]

    def between(step, ps, opt):
        _grads(ps, step)
        if step % 3 == 1:
            monkeypatch.setenv(kernels.DISABLE_ENV, "1")
        else:
            monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)

    _assert_same(_twin_runs(name, kwargs, 9, between))
