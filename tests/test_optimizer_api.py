"""torch.optim conventions, state_dict round trips, input validation, half precision, RAdam."""

from __future__ import annotations

import copy
import io
import math

import adamp
import pytest
import torch
from helpers import MODES, forced_grad, make_params, max_rel_err

import hf_adamp
from hf_adamp.optim import _step

OPTIMIZERS = {
    "AdamP": (hf_adamp.AdamP, adamp.AdamP, dict(lr=1e-2, weight_decay=0.1)),
    "SGDP": (hf_adamp.SGDP, adamp.SGDP, dict(lr=1e-2, momentum=0.9, weight_decay=0.1)),
}


def feed(params, step, gen):
    for p in params:
        p.grad = forced_grad(p, MODES[step % len(MODES)], gen)


def train(opt, params, steps, gen, start=0):
    for s in range(start, start + steps):
        feed(params, s, gen)
        opt.step()


def clone_params(base):
    return [p.clone().requires_grad_() for p in base]


# ----- state_dict -----
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("foreach", [False, True], ids=["plain", "fast"])
def test_resume_is_bit_identical(name, foreach):
    cls, _, kw = OPTIMIZERS[name]
    base = make_params(dtype=torch.float32)
    straight, resumed = clone_params(base), clone_params(base)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    opt = cls(straight, foreach=foreach, **kw)
    train(opt, straight, 20, gen_a)

    first = cls(resumed, foreach=foreach, **kw)
    train(first, resumed, 10, gen_b)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = cls(resumed, foreach=foreach, **kw)
    second.load_state_dict(saved)
    train(second, resumed, 10, gen_b, start=10)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_keys_match_reference(name):
    cls, ref_cls, kw = OPTIMIZERS[name]
    base = make_params()
    ours, ref = clone_params(base), clone_params(base)
    o, r = cls(ours, **kw), ref_cls(ref, **kw)
    train(o, ours, 2, torch.Generator().manual_seed(0))
    train(r, ref, 2, torch.Generator().manual_seed(0))
    ours_state, ref_state = o.state_dict()["state"], r.state_dict()["state"]
    assert ours_state.keys() == ref_state.keys()
    for k in ours_state:
        # the fused kernels' guess of the next outcome (a list of ints) is the one key of our own
        assert ours_state[k].keys() - {_step.MEMORY_KEY} == ref_state[k].keys()
        if _step.MEMORY_KEY in ours_state[k]:
            assert base[k].dim() > 1 and isinstance(ours_state[k][_step.MEMORY_KEY], list)
    assert set(ours_state[0]) == ({"step", "exp_avg", "exp_avg_sq"} if name == "AdamP" else {"momentum"})


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_checkpoints_move_between_reference_and_ours(name):
    """adamp -> ours and ours -> adamp, training continues as an uninterrupted reference run."""
    cls, ref_cls, kw = OPTIMIZERS[name]
    base = make_params()
    straight = clone_params(base)
    r = ref_cls(straight, **kw)
    train(r, straight, 30, torch.Generator().manual_seed(2))

    moved = clone_params(base)
    gen = torch.Generator().manual_seed(2)
    first = ref_cls(moved, **kw)
    train(first, moved, 10, gen)
    middle = cls(moved, **kw)
    middle.load_state_dict(first.state_dict())
    train(middle, moved, 10, gen, start=10)
    last = ref_cls(moved, **kw)
    last.load_state_dict(middle.state_dict())
    train(last, moved, 10, gen, start=20)
    for a, b in zip(moved, straight):
        assert max_rel_err(a.detach(), b.detach()) <= 1e-12


def test_half_precision_params_keep_fp32_state_through_load():
    p = torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = hf_adamp.AdamP([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    fresh = hf_adamp.AdamP([p], lr=1e-3)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


# ----- torch.optim conventions -----
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_closure_scheduler_zero_grad_and_add_param_group(name):
    cls, _, kw = OPTIMIZERS[name]
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    extra = torch.nn.Parameter(torch.randn(3, 3))
    opt = cls(model.parameters(), **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = torch.randn(16, 5), torch.randn(16, 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) + (extra**2).sum()
        loss.backward()
        return loss

    losses = []
    for i in range(6):
        if i == 3:
            opt.add_param_group({"params": [extra], "lr": 0.1})
        before = extra.detach().clone()
        losses.append(opt.step(closure).item())
        sched.step()
        assert torch.equal(before, extra) == (i < 3)
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(kw["lr"] * 0.5**3)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_deepcopy_is_independent_and_identical(name):
    cls, _, kw = OPTIMIZERS[name]
    base = make_params()
    ps = clone_params(base)
    opt = cls(ps, **kw)
    train(opt, ps, 3, torch.Generator().manual_seed(0))
    twin = copy.deepcopy({"params": ps, "opt": opt})
    train(opt, ps, 3, torch.Generator().manual_seed(9), start=3)
    train(twin["opt"], twin["params"], 3, torch.Generator().manual_seed(9), start=3)
    for a, b in zip(ps, twin["params"]):
        assert torch.equal(a, b) and a is not b


def test_channels_last_conv_weight_matches_contiguous():
    w = torch.randn(8, 3, 5, 5)
    a = w.clone().requires_grad_()
    b = w.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    oa, ob = hf_adamp.AdamP([a], lr=1e-2), hf_adamp.AdamP([b], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(10):
        g = forced_grad(a, MODES[step % 4], gen)
        a.grad, b.grad = g.clone(), g.clone().contiguous(memory_format=torch.channels_last)
        oa.step()
        ob.step()
    assert max_rel_err(b.detach(), a.detach()) <= 1e-6


# ----- bad input -----
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(delta=-0.1), "delta"),
        (dict(wd_ratio=1.5), "wd_ratio"),
        (dict(wd_ratio=-0.1), "wd_ratio"),
        (dict(betas=(1.0, 0.999)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(lr=float("nan")), "lr"),
    ],
)
def test_adamp_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hf_adamp.AdamP([torch.nn.Parameter(torch.randn(2, 2))], **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=0.1, momentum=-0.5), "momentum"),
        (dict(lr=0.1, momentum=1.0), "momentum"),
        (dict(lr=0.1, dampening=2.0), "dampening"),
        (dict(lr=0.1, eps=-1.0), "eps"),
        (dict(lr=0.1, delta=-1.0), "delta"),
        (dict(lr=0.1, wd_ratio=2.0), "wd_ratio"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
    ],
)
def test_sgdp_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hf_adamp.SGDP([torch.nn.Parameter(torch.randn(2, 2))], **kwargs)


def test_type_errors():
    p = [torch.nn.Parameter(torch.randn(2, 2))]
    with pytest.raises(ValueError, match="lr"):  # no lr, here or in the group: torch's (and the reference's) error
        hf_adamp.SGDP(p)
    with pytest.raises(TypeError, match="lr"):
        hf_adamp.AdamP(p, lr="0.1")
    with pytest.raises(TypeError, match="betas"):
        hf_adamp.AdamP(p, betas=0.9)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sparse_and_complex_are_refused(name):
    cls, _, kw = OPTIMIZERS[name]
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        cls(emb.parameters(), **kw).step()
    z = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    z.grad = torch.randn_like(z)
    with pytest.raises(TypeError, match="complex"):
        cls([z], **kw).step()


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("foreach", [False, True], ids=["plain", "fast"])
def test_zero_weights_and_zero_gradients_give_no_nan(name, foreach):
    cls, ref_cls, kw = OPTIMIZERS[name]
    shapes = [(4, 6), (3, 2, 2), (5,)]
    for make_p, make_g in [(torch.zeros, torch.randn), (torch.randn, torch.zeros), (torch.zeros, torch.zeros)]:
        ours = [make_p(s).requires_grad_() for s in shapes]
        ref = [p.detach().clone().requires_grad_() for p in ours]
        o, r = cls(ours, foreach=foreach, **kw), ref_cls(ref, **kw)
        for _ in range(3):
            for a, b in zip(ours, ref):
                g = make_g(a.shape)
                a.grad, b.grad = g.clone(), g.clone()
            o.step()
            r.step()
        for a, b in zip(ours, ref):
            assert torch.isfinite(a).all()
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


# ----- half precision -----
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("foreach", [False, True], ids=["plain", "fast"])
def test_half_precision_tracks_fp32(dtype, name, foreach):
    cls, _, kw = OPTIMIZERS[name]
    # steps well above the weights' half-precision resolution: pure half weights lose smaller ones
    kw = dict(kw, lr=1e-2)
    base = [0.1 * p for p in make_params([(16, 32), (8, 3, 3), (32,)], dtype=torch.float32, seed=4)]
    full = clone_params(base)
    half = [p.to(dtype).requires_grad_() for p in base]
    of, oh = cls(full, foreach=foreach, **kw), cls(half, foreach=foreach, **kw)
    gen = torch.Generator().manual_seed(0)
    for step in range(20):
        for a, b in zip(full, half):
            g = forced_grad(a, MODES[step % 4], gen) * 1e-3  # small gradients: fp16 moments would underflow
            a.grad, b.grad = g, g.to(dtype)
        of.step()
        oh.step()
    for p0, a, b in zip(base, full, half):
        assert torch.isfinite(b).all()
        assert all(t.dtype == torch.float32 for t in oh.state[b].values() if isinstance(t, torch.Tensor))
        moved = (a - p0).abs().max()
        # a few percent of how far training moved them, plus the rounding of 20 half-precision steps
        rounding = 4 * 20**0.5 * torch.finfo(dtype).eps * a.abs().max()
        assert (b.float() - a).abs().max() <= 0.05 * moved + rounding


# ----- RAdam -----
def radam_by_definition(params, grads_per_step, lr, betas, eps, weight_decay):
    """Algorithm 2 of Liu et al. (2020), with decoupled weight decay as in the authors' code."""
    beta1, beta2 = betas
    rho_inf = 2 / (1 - beta2) - 1
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for p, g, m_i, v_i in zip(params, grads, m, v):
            p.mul_(1 - lr * weight_decay)
            m_i.mul_(beta1).add_((1 - beta1) * g)
            v_i.mul_(beta2).add_((1 - beta2) * g * g)
            m_hat = m_i / (1 - beta1**t)
            rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
            if rho_t > 5:
                r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                # the authors' code adds eps to sqrt(v) before the bias correction
                p.sub_(lr * r_t * m_hat * math.sqrt(1 - beta2**t) / (v_i.sqrt() + eps))
            else:
                p.sub_(lr * m_hat)
    return params


def test_radam_matches_its_definition_with_decoupled_decay():
    base = make_params(dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    steps = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in base] for _ in range(50)]
    ours = clone_params(base)
    opt = hf_adamp.RAdam(ours, lr=1e-2, weight_decay=0.1)
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    for grads in steps:
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
    expected = radam_by_definition([p.clone() for p in base], steps, 1e-2, (0.9, 0.999), 1e-8, 0.1)
    for a, b in zip(ours, expected):
        assert max_rel_err(a.detach(), b) <= 1e-12
