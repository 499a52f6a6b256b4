"""hf_adamp.AdamP/SGDP against the reference adamp 0.3.0, on both code paths, every projection outcome."""

from __future__ import annotations

import itertools

import adamp
import pytest
import torch
from helpers import MODES, SHAPES, expected_outcomes, forced_grad, make_params, max_rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_adamp
from hf_adamp import kernels
from hf_adamp.optim.backends import eager

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}

CONFIGS = [
    ("AdamP", dict(lr=1e-2)),
    ("AdamP", dict(lr=1e-2, weight_decay=0.1, nesterov=True)),
    ("AdamP", dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.05, delta=0.2, wd_ratio=0.5, eps=1e-6)),
    ("SGDP", dict(lr=1e-2, momentum=0.9, weight_decay=0.1)),
    ("SGDP", dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGDP", dict(lr=1e-2, momentum=0.5, dampening=0.3, weight_decay=1e-3)),
    ("SGDP", dict(lr=1e-2)),
]


def run_pair(name, kwargs, dtype, foreach, steps=50, seed=0, none_grad_every=7, groups=False):
    """Step ours and the reference on identical copies; return both params and our decisions."""
    base = make_params(dtype=dtype, seed=seed)
    ours = [p.clone().requires_grad_() for p in base]
    ref = [p.clone().requires_grad_() for p in base]

    def param_groups(ps):
        if not groups:
            return ps
        return [{"params": ps[::2]}, {"params": ps[1::2], "lr": kwargs["lr"] * 0.5, "weight_decay": 0.02}]

    opt = getattr(hf_adamp, name)(param_groups(ours), foreach=foreach, **kwargs)
    ref_opt = getattr(adamp, name)(param_groups(ref), **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    seen = {i: set() for i in range(len(base))}
    for step in range(steps):
        mode = MODES[step % len(MODES)]
        for i, (a, b) in enumerate(zip(ours, ref)):
            if none_grad_every and (step + i) % none_grad_every == 0:
                a.grad = b.grad = None  # a parameter without a gradient this step is skipped
                continue
            g = forced_grad(a, mode, gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        decisions = opt.projection_decisions()
        for i, a in enumerate(ours):
            if a in decisions:
                seen[i].add(decisions[a])
    return ours, ref, seen


@pytest.mark.parametrize("foreach", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_matches_reference_after_50_steps(name, kwargs, dtype, foreach):
    ours, ref, seen = run_pair(name, kwargs, dtype, foreach)
    for shape, a, b in zip(SHAPES, ours, ref):
        assert max_rel_err(a.detach(), b.detach()) <= TOL[dtype], shape
    for i, shape in enumerate(SHAPES):
        assert seen[i] == expected_outcomes(shape), (shape, seen[i])


@pytest.mark.parametrize("foreach", [False, True], ids=["plain", "fast"])
def test_param_groups_match_reference(foreach):
    for name, kwargs in (CONFIGS[1], CONFIGS[4]):
        ours, ref, _ = run_pair(name, kwargs, torch.float64, foreach, steps=20, groups=True)
        for a, b in zip(ours, ref):
            assert max_rel_err(a.detach(), b.detach()) <= 1e-12


def test_fast_path_with_small_chunks_matches_reference(monkeypatch):
    """Chunks shorter than a row, and rows split over several chunks of whole rows (the eager fast path: the
    fused kernels take whole pieces)."""
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    monkeypatch.setattr(eager, "CHUNK_ELEMS", 50)
    for name, kwargs in (CONFIGS[1], CONFIGS[3], CONFIGS[4]):
        ours, ref, seen = run_pair(name, kwargs, torch.float64, True, steps=20)
        for a, b in zip(ours, ref):
            assert max_rel_err(a.detach(), b.detach()) <= 1e-12
        assert seen[1] == {"channel", "layer", "none"}


def test_projection_is_really_taken():
    """Against plain Adam: with gradients orthogonal to each row, AdamP keeps the weight norm from growing."""
    torch.manual_seed(0)
    w0 = 0.1 * torch.randn(32, 64)
    norms = {}
    for cls in (hf_adamp.AdamP, torch.optim.Adam):
        w = w0.clone().requires_grad_()
        opt = cls([w], lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(50):
            w.grad = forced_grad(w, "channel", gen)
            opt.step()
        norms[cls.__name__] = w.detach().norm().item()
    growth = {k: v / w0.norm().item() - 1 for k, v in norms.items()}
    assert growth["Adam"] > 0.2 and growth["Adam"] > 5 * abs(growth["AdamP"]), growth


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple), min_size=1, max_size=4),
    name=st.sampled_from(["AdamP", "SGDP"]),
    lr=st.floats(1e-4, 1e-1),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.3]),
    delta=st.floats(0.01, 1.0),
    wd_ratio=st.floats(0.0, 1.0),
    nesterov=st.booleans(),
    momentum=st.floats(0.1, 0.95),
    foreach=st.booleans(),
    modes=st.lists(st.sampled_from(MODES), min_size=3, max_size=8),
)
def test_property_random_shapes_and_hyperparameters(
    shapes, name, lr, weight_decay, delta, wd_ratio, nesterov, momentum, foreach, modes
):
    kwargs = dict(lr=lr, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, nesterov=nesterov)
    if name == "SGDP":
        kwargs["momentum"] = momentum
    base = make_params(shapes, dtype=torch.float64, seed=len(shapes))
    ours = [p.clone().requires_grad_() for p in base]
    ref = [p.clone().requires_grad_() for p in base]
    opt = getattr(hf_adamp, name)(ours, foreach=foreach, **kwargs)
    ref_opt = getattr(adamp, name)(ref, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for mode in modes:
        for a, b in zip(ours, ref):
            g = forced_grad(a, mode, gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        assert max_rel_err(a.detach(), b.detach()) <= 1e-10


@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[4], CONFIGS[5]])
def test_fast_equals_plain_with_maximize_and_missing_grads(name, kwargs):
    base = make_params(dtype=torch.float32, seed=3)
    runs = {}
    for foreach, maximize in itertools.product([False, True], [False, True]):
        ps = [p.clone().requires_grad_() for p in base]
        opt = getattr(hf_adamp, name)(ps, foreach=foreach, maximize=maximize, **kwargs)
        gen = torch.Generator().manual_seed(5)
        for step in range(30):
            for i, p in enumerate(ps):
                g = forced_grad(p, MODES[step % 4], gen)
                p.grad = None if (step + i) % 5 == 0 else (-g if maximize else g)
            opt.step()
        runs[foreach, maximize] = [p.detach() for p in ps]
    reference = runs[False, False]
    for key, params in runs.items():
        for a, b in zip(params, reference):
            assert max_rel_err(a, b) <= 1e-6, key
