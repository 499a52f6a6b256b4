"""Drop-in behaviour: what torch's optimizers and ``adamp`` 0.3.0 accept and compute, ours must too.

One test per defect found by a generic optimizer suite and an adversarial pass; each compares with the reference
(or torch) on every path: plain (``foreach=False``), the fused CPU kernels (speculating and two-pass), and the
eager chunked path.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import adamp
import pytest
import torch
from helpers import forced_grad

import hf_adamp
from hf_adamp import kernels
from hf_adamp.optim import _step

PATHS = ("plain", "fused", "fused-two-pass", "eager")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The step path under test, as the ``foreach`` to pass; the environment chooses kernels or eager."""
    monkeypatch.delenv(_step.SPECULATE_ENV, raising=False)
    if request.param == "eager":
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    else:
        monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    if request.param.startswith("fused"):
        if kernels._compiler() is None:
            pytest.skip("no C++ compiler: the fused kernels cannot be built here")
        assert kernels.available()
        if request.param == "fused-two-pass":
            monkeypatch.setenv(_step.SPECULATE_ENV, "0")
    return False if request.param == "plain" else None


def channel_grad(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return forced_grad(p.detach(), "channel", gen)


def random_grad(p: torch.Tensor, step: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(p.shape, generator=gen, dtype=p.dtype)


def mixed_grad(p: torch.Tensor, step: int, gen: torch.Generator) -> torch.Tensor:
    """Channel-projected on odd steps, random on even ones."""
    return channel_grad(p, gen) if step % 2 else random_grad(p, step, gen)


def run_both(ours, ref, params_ours, params_ref, steps, grad_fn, seed=0):
    """Step both optimizers with the same gradients (grad_fn(param, step, generator))."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for a, b in zip(params_ours, params_ref):
            g = grad_fn(b, step, gen)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()


def assert_close(got, want, rtol=1e-5, atol=1e-7):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol, equal_nan=True)


# ----- 1. strided parameters -----
def strided_params(dtype=torch.float64):
    """A column-strided view (shape (10, 5), strides (10, 2)), a transposed weight, an as_strided parameter,
    and a dense one beside them."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(10, 10, generator=gen, dtype=dtype)
    col = torch.nn.Parameter(base[:, ::2])
    trans = torch.nn.Parameter(torch.randn(7, 6, generator=gen, dtype=dtype).t())
    strided = torch.nn.Parameter(torch.randn(40, generator=gen, dtype=dtype).as_strided((4, 3, 2), (9, 3, 1)))
    dense = torch.nn.Parameter(torch.randn(5, 4, generator=gen, dtype=dtype))
    return [col, trans, strided, dense]


@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_strided_parameters_step_like_the_reference(path, name):
    params = strided_params()
    assert params[0].stride() == (10, 2) and params[1].stride() == (1, 6)
    # same values, contiguous (the reference refuses a transposed weight: its view(rows, -1) fails)
    twins = [torch.nn.Parameter(p.detach().clone(memory_format=torch.contiguous_format)) for p in params]
    kw = dict(lr=0.05, weight_decay=0.1) if name == "AdamP" else dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    ours = getattr(hf_adamp, name)(params, foreach=path, **kw)
    ref = getattr(adamp, name)(twins, **kw)
    run_both(ours, ref, params, twins, 6, mixed_grad)
    assert_close(params, twins, rtol=1e-10, atol=1e-12)
    assert params[0].stride() == (10, 2), "the step must update the parameter in place"
    assert "channel" in ours.projection_decisions().values()


def test_strided_parameter_matches_torch_adamw_when_never_projected(path):
    # delta=0: the cosine test never passes, so AdamP is AdamW (torch's own optimizer as the control)
    params = strided_params(torch.float32)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in strided_params(torch.float32)]
    ours = hf_adamp.AdamP(params, lr=0.01, weight_decay=0.1, delta=0.0, foreach=path)
    ref = torch.optim.AdamW(twins, lr=0.01, weight_decay=0.1, foreach=False)
    run_both(ours, ref, params, twins, 4, random_grad)
    assert_close(params, twins, rtol=1e-5, atol=1e-6)


# ----- 2. SGDP with per-group lr and no constructor lr -----
def test_sgdp_takes_per_group_lr_without_a_constructor_lr(path):
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=torch.float64)) for _ in range(2))
    ra, rb = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    ours = hf_adamp.SGDP([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], momentum=0.9, foreach=path)
    ref = adamp.SGDP([{"params": [ra], "lr": 0.1}, {"params": [rb], "lr": 0.01}], momentum=0.9)
    run_both(ours, ref, [a, b], [ra, rb], 4, random_grad)
    assert_close([a, b], [ra, rb], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="lr"):  # a group without lr, and none to default to: torch's error
        hf_adamp.SGDP([{"params": [a]}])


# ----- 3. tensor lr of shape [1] and [1, 1] -----
@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1", "1x1"])
def test_one_element_tensor_lr_steps_like_a_float(path, name, shape):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
    with_tensor = [torch.nn.Parameter(t.clone()) for t in base]
    with_float = [torch.nn.Parameter(t.clone()) for t in base]
    extra = dict(momentum=0.9) if name == "SGDP" else {}
    cls = getattr(hf_adamp, name)
    ours = cls(with_tensor, lr=torch.full(shape, 0.01, dtype=torch.float64), weight_decay=0.1, foreach=path, **extra)
    ref = cls(with_float, lr=0.01, weight_decay=0.1, foreach=path, **extra)
    run_both(ours, ref, with_tensor, with_float, 3, random_grad)
    assert_close(with_tensor, with_float, rtol=1e-12, atol=1e-14)


# ----- 4. RAdam keeps its decoupled default through a checkpoint without the key -----
def test_radam_resumes_decoupled_from_a_checkpoint_without_the_key():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = hf_adamp.RAdam([p], lr=0.01, weight_decay=0.1)
    p.grad = torch.randn_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:  # as the authors' code and older torch save it
        del group["decoupled_weight_decay"]
    resumed = hf_adamp.RAdam([p], lr=0.01, weight_decay=0.1)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["decoupled_weight_decay"] is True
    # torch's RAdam keeps its own default (L2) for such a checkpoint
    plain = torch.optim.RAdam([p], lr=0.01, weight_decay=0.1)
    plain.load_state_dict(copy.deepcopy(saved))
    assert plain.param_groups[0]["decoupled_weight_decay"] is False


# ----- 5. SGDP(nesterov=True) with momentum 0 -----
def test_sgdp_nesterov_without_momentum_warns_and_steps_like_the_reference(path):
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(6, 5, generator=gen, dtype=torch.float64))
    r = torch.nn.Parameter(p.detach().clone())
    with pytest.warns(UserWarning, match="nesterov=True has no effect"):
        ours = hf_adamp.SGDP([p], lr=0.1, nesterov=True, dampening=0.3, weight_decay=0.1, foreach=path)
    ref = adamp.SGDP([r], lr=0.1, nesterov=True, dampening=0.3, weight_decay=0.1)
    run_both(ours, ref, [p], [r], 4, mixed_grad)
    assert_close([p], [r], rtol=1e-10, atol=1e-12)


# ----- 6. error wording of torch's own checks -----
@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("AdamP", dict(lr=-1.0), r"Invalid learning rate: -1.0"),
        ("SGDP", dict(lr=-1.0), r"Invalid learning rate: -1.0"),
        ("AdamP", dict(lr=torch.tensor([1e-3, 1e-3])), r"Tensor lr must be 1-element"),
        ("SGDP", dict(lr=torch.tensor([1e-3, 1e-3])), r"Tensor lr must be 1-element"),
        ("AdamP", dict(eps=-1.0), r"Invalid epsilon value: -1.0"),
        ("AdamP", dict(betas=(1.0, 0.999)), r"Invalid beta parameter at index 0: 1.0"),
        ("AdamP", dict(betas=(0.9, -0.1)), r"Invalid beta parameter at index 1: -0.1"),
        ("AdamP", dict(weight_decay=-1), r"Invalid weight_decay value: -1"),
        ("SGDP", dict(lr=0.1, momentum=-0.5), r"Invalid momentum value: -0.5"),
        ("SGDP", dict(lr=0.1, weight_decay=-0.5), r"Invalid weight_decay value: -0.5"),
    ],
)
def test_errors_use_torch_wording(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(hf_adamp, name)([torch.nn.Parameter(torch.randn(2, 2))], **kwargs)


# ----- 7. a non-finite gradient element stays in its element -----
@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_gradient_element_does_not_spread_to_its_row(path, name, bad):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 16, generator=gen)
    p, r = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
    kw = dict(lr=0.01, weight_decay=0.1) if name == "AdamP" else dict(lr=0.01, momentum=0.9, weight_decay=0.1)
    ours, ref = getattr(hf_adamp, name)([p], foreach=path, **kw), getattr(adamp, name)([r], **kw)

    def grad(t, step, gen):
        g = channel_grad(t, gen)  # channel-projected steps first, so the fused path speculates "channel"
        if step == 3:
            g[2, 5] = bad
        return g

    run_both(ours, ref, [p], [r], 4, grad)
    state_key = "exp_avg" if name == "AdamP" else "momentum"
    assert torch.isnan(r).sum() <= 1
    assert torch.equal(torch.isfinite(p), torch.isfinite(r))
    assert torch.equal(torch.isfinite(ours.state[p][state_key]), torch.isfinite(ref.state[r][state_key]))
    finite = torch.isfinite(r)
    torch.testing.assert_close(p[finite], r[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.slow
def test_non_finite_gradient_element_under_fsdp2_stays_in_its_element(tmp_path, monkeypatch):
    from _dist_helpers import run_ranks
    from _fsdp_workers import nan_gradient_element

    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.delenv(_step.SPECULATE_ENV, raising=False)
    out = run_ranks(nan_gradient_element, 2, tmp_path, timeout=240)
    for rank in out:  # the reference (one process) has 1 NaN weight and 1 NaN moment
        assert rank["speculated"], "fc1 should have been channel-projected before"
        assert rank["nan_weights"] == 1 and rank["nan_exp_avg"] == 1


# ----- 8. extreme but finite magnitudes: sums that overflow fp32 -----
# The control is the reference run in fp64: its own fp32 run overflows in places too (torch's fp32 norms).
def run_against_fp64_reference(name, base, grad_fn, steps, path, row_scaled=False, **kw):
    """Steps ours in fp32 and the reference in fp64 alike; returns our last decision. row_scaled: the tolerance
    is relative to each row's largest weight (rows that mix magnitudes lose their small elements to rounding)."""
    p, r = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.double())
    ours, ref = getattr(hf_adamp, name)([p], foreach=path, **kw), getattr(adamp, name)([r], **kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        g = grad_fn(r.detach(), step, gen)
        p.grad, r.grad = g.float(), g.double()
        ours.step()
        ref.step()
    assert not torch.isnan(p).any()
    if row_scaled:
        scale = r.detach().abs().amax(1, keepdim=True)
        torch.testing.assert_close(p.detach().double() / scale, r.detach() / scale, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(p.detach(), r.detach().float(), rtol=1e-5, atol=0)
    return ours.projection_decisions()[p]


def test_sgdp_with_huge_gradients_decides_like_the_reference(path):
    base = torch.randn(16, 48, generator=torch.Generator().manual_seed(0))
    run_against_fp64_reference(
        "SGDP", base, lambda t, s, gen: 1e20 * torch.randn(t.shape, generator=gen, dtype=t.dtype), 4, path,
        lr=0.01, momentum=0.9,
    )  # fmt: skip


def test_adamp_with_huge_weights_and_gradients_matches_the_reference(path):
    base = 1e19 * torch.randn(16, 48, generator=torch.Generator().manual_seed(0))

    def grad(t, step, gen):
        g = channel_grad(t, gen) if step != 1 else torch.randn(t.shape, generator=gen, dtype=t.dtype)
        return 1e19 * g / g.norm(dim=1, keepdim=True)

    assert run_against_fp64_reference("AdamP", base, grad, 3, path, lr=1e17) == "channel"


@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_sums_overflowing_in_one_block_of_a_long_row_match_the_reference(path, name):
    # rows of 2500 span three of the kernels' summing blocks (1024 elements): one block of row 1 holds huge
    # weights, one block of row 2 huge gradients; the other blocks and rows stay ordinary
    base = torch.randn(3, 2500, generator=torch.Generator().manual_seed(0))
    base[1, 1100:1300] *= 3e18

    def grad(t, step, gen):
        g = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        g[2, 2100:2300] *= 3e18
        if step in (1, 2):  # channel-projected: the fused path's next step speculates "channel"
            g = g - t * (g * t).sum(1, keepdim=True) / (t * t).sum(1, keepdim=True)
        return g

    # steps: two-pass (FIRST), then on the fused path a "layer" guess (SPEC) and two "channel" guesses
    kw = dict(lr=1e16) if name == "AdamP" else dict(lr=0.01, momentum=0.9)
    last = run_against_fp64_reference(name, base, grad, 4, path, row_scaled=True, **kw)
    assert last == ("layer" if name == "AdamP" else "none")


# ----- 9. a parameter appended to a group by hand -----
@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_parameter_appended_to_a_group_by_hand_is_stepped(path, name):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    rw, rbias = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(bias.detach().clone())
    kw = dict(lr=0.05, weight_decay=0.1) if name == "AdamP" else dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    ours, ref = getattr(hf_adamp, name)([w], foreach=path, **kw), getattr(adamp, name)([rw], **kw)
    run_both(ours, ref, [w], [rw], 1, random_grad)
    ours.param_groups[0]["params"].append(bias)  # torch and the reference allow this
    ref.param_groups[0]["params"].append(rbias)
    run_both(ours, ref, [w, bias], [rw, rbias], 3, random_grad)
    assert_close([w, bias], [rw, rbias], rtol=1e-10, atol=1e-12)


# ----- 10. the same parameter twice in one group -----
@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_duplicate_parameter_in_a_group_is_refused_clearly(path, name):
    p = torch.nn.Parameter(torch.randn(3, 3))
    cls = getattr(hf_adamp, name)
    with pytest.raises(ValueError, match="a parameter group with duplicate parameters"):
        cls([p, p], lr=0.1, foreach=path)
    with pytest.raises(ValueError, match="a parameter group with duplicate parameters"):
        cls([{"params": [p]}], lr=0.1, foreach=path).add_param_group({"params": [q := torch.randn(2, 2), q]})
    opt = cls([p], lr=0.1, foreach=path)
    p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["params"].append(p)  # by hand, after construction
    with pytest.raises(ValueError, match="a parameter group with duplicate parameters"):
        opt.step()


# ----- 11. DeepSpeed stage 0 with bf16 (FP16_UnfusedOptimizer: full-shape fp32 copies) -----
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_stage0_bf16_steps_the_fp32_copies_exactly(tmp_path):
    from _dist_helpers import run_ranks
    from _ds_workers import bf16_stage0_both

    out = run_ranks(bf16_stage0_both, 1, tmp_path, timeout=300)[0]
    ours, ref = out["ours"], out["reference"]
    assert ours["wrapper"] == ref["wrapper"] == "FP16_UnfusedOptimizer"
    assert "channel" in ours["decisions"][(19, 11)] and "layer" in ours["decisions"][(13, 19)]
    for name, master in ours["masters"].items():
        want = ref["masters"][name]
        assert master.dtype == torch.float32
        assert ((master - want).abs().max() / want.abs().max().clamp_min(1e-30)).item() < 1e-6, name


# ----- 12. an Inf weight element stays Inf -----
@pytest.mark.parametrize("name", ["SGDP", "AdamP"])
def test_inf_weight_element_stays_inf_like_the_reference(path, name):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    base[1, 3] = float("inf")
    p, r = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
    kw = dict(lr=0.01, weight_decay=0.1) if name == "AdamP" else dict(lr=0.01, momentum=0.9, weight_decay=0.1)
    ours, ref = getattr(hf_adamp, name)([p], foreach=path, **kw), getattr(adamp, name)([r], **kw)
    run_both(ours, ref, [p], [r], 2, random_grad)
    assert torch.isinf(r[1, 3]) and not torch.isnan(r).any()
    assert torch.equal(torch.isnan(p), torch.isnan(r))
    assert_close([p], [r], rtol=1e-5, atol=1e-6)


def test_no_warning_for_plain_use():
    # the nesterov warning is only for nesterov=True with momentum=0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_adamp.SGDP([torch.nn.Parameter(torch.randn(2, 2))], lr=0.1, momentum=0.9, nesterov=True)
