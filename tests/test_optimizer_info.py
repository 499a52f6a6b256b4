"""torch's generic optimizer checks, driven by ``OptimizerInfo`` entries for AdamP, SGDP and RAdam.

The entries (constructor inputs, error inputs, schedulers, supported flags) use the machinery torch ships in
``torch.testing._internal.common_optimizers``; the checks below are the generic ones torch's own optimizers pass
(errors, foreach against the for-loop, state_dict round trips, hooks, param groups, schedulers, tensor lr,
closures, direction, dtypes), on CPU, with ``foreach`` True and False. Inputs use ``delta=1`` where they should
make the projection happen on these small matrices; the foreach check asserts that it did.

Skipped, each with its reason (``SKIPS``): for AdamP and SGDP, torch's "duplicate parameters" error input, which
expects a UserWarning, where they raise a ValueError with the same words (README, "Drop-in").
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.nn import Parameter

common_optimizers = pytest.importorskip(
    "torch.testing._internal.common_optimizers", reason="torch's test helpers need the expecttest package"
)
from torch.testing._internal.common_optimizers import (  # noqa: E402
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
    optim_inputs_func_radam,
)

import hf_adamp  # noqa: E402

# Error inputs of torch's generic list that hf_adamp answers differently on purpose: (optimizer, description).
_DUPLICATES = "a param group cannot have duplicate parameters"
_DUPLICATES_REASON = (
    "hf_adamp refuses a duplicated parameter with a ValueError (same words as torch's UserWarning); torch steps it "
    "twice"
)
SKIPS = {("AdamP", _DUPLICATES): _DUPLICATES_REASON, ("SGDP", _DUPLICATES): _DUPLICATES_REASON}


def inputs_adamp(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"delta": 1.0}, desc="projecting"),
        OptimizerInput(params=None, kwargs={"delta": 1.0, "lr": 2e-3}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"delta": 1.0, "lr": torch.tensor(1e-3)}, desc="tensor lr"),
        OptimizerInput(params=None, kwargs={"delta": 1.0, "weight_decay": 0.1}, desc="weight_decay"),
        OptimizerInput(params=None, kwargs={"delta": 1.0, "weight_decay": 0.1, "wd_ratio": 0.5}, desc="wd_ratio"),
        OptimizerInput(params=None, kwargs={"delta": 1.0, "nesterov": True}, desc="nesterov"),
        OptimizerInput(params=None, kwargs={"delta": 1.0, "weight_decay": 0.1, "maximize": True}, desc="maximize"),
        OptimizerInput(params=None, kwargs={"delta": 1.0, "betas": (0.8, 0.99), "eps": 1e-6}, desc="betas, eps"),
    ]


def inputs_sgdp(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={"lr": 1e-2}, desc="lr"),
        OptimizerInput(params=None, kwargs={"lr": 1e-2, "delta": 1.0}, desc="projecting"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(1e-2), "delta": 1.0}, desc="tensor lr"),
        OptimizerInput(params=None, kwargs={"lr": 1e-2, "delta": 1.0, "momentum": 0.9}, desc="momentum"),
        OptimizerInput(
            params=None, kwargs={"lr": 1e-2, "delta": 1.0, "momentum": 0.9, "dampening": 0.5}, desc="dampening"
        ),
        OptimizerInput(
            params=None,
            kwargs={"lr": 1e-2, "delta": 1.0, "momentum": 0.9, "weight_decay": 0.1},
            desc="weight_decay w/ momentum",
        ),
        OptimizerInput(
            params=None,
            kwargs={"lr": 1e-2, "delta": 1.0, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
            desc="nesterov",
        ),
        OptimizerInput(
            params=None, kwargs={"lr": 1e-2, "delta": 1.0, "weight_decay": 0.1, "maximize": True}, desc="maximize"
        ),
    ]


def inputs_radam(device, dtype=None):
    extra = [OptimizerInput(params=None, kwargs={"weight_decay": 0.1, "decoupled_weight_decay": False}, desc="L2")]
    return optim_inputs_func_radam(device, dtype) + extra


def with_lr(error_inputs, lr):
    """torch's generic error inputs, given an lr where they have none (SGDP needs one, like the reference)."""
    out = []
    for e in error_inputs:
        inp = e.optimizer_error_input
        kwargs = inp.kwargs if "lr" in inp.kwargs else {**inp.kwargs, "lr": lr}
        out.append(
            ErrorOptimizerInput(
                OptimizerInput(params=inp.params, kwargs=kwargs, desc=inp.desc),
                error_on=e.error_on,
                error_type=e.error_type,
                error_regex=e.error_regex,
            )
        )
    return out


def bad(kwargs, regex, desc):
    return ErrorOptimizerInput(OptimizerInput(params=None, kwargs=kwargs, desc=desc), error_type=ValueError,
                               error_regex=regex)  # fmt: skip


def errors_adamp(device, dtype):
    return get_error_inputs_for_all_optims(device, dtype) + [
        bad(dict(lr=-1.0), "Invalid learning rate: -1.0", "negative lr"),
        bad(dict(betas=(1.0, 0.0)), "Invalid beta parameter at index 0: 1.0", "beta1 in [0, 1)"),
        bad(dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0", "beta2 in [0, 1)"),
        bad(dict(weight_decay=-1), "Invalid weight_decay value: -1", "negative weight_decay"),
        bad(dict(eps=-1.0), "Invalid epsilon value: -1.0", "negative eps"),
        bad(dict(delta=-1.0), "Invalid delta: -1.0", "negative delta"),
        bad(dict(wd_ratio=2.0), "Invalid wd_ratio: 2.0", "wd_ratio in [0, 1]"),
    ]


def errors_sgdp(device, dtype):
    return with_lr(get_error_inputs_for_all_optims(device, dtype), 1e-2) + [
        bad(dict(lr=-1.0), "Invalid learning rate: -1.0", "negative lr"),
        bad(dict(lr=1e-2, momentum=-0.5), "Invalid momentum value: -0.5", "momentum in [0, 1)"),
        bad(dict(lr=1e-2, weight_decay=-0.5), "Invalid weight_decay value: -0.5", "negative weight_decay"),
        bad(dict(lr=1e-2, dampening=2.0), "Invalid dampening: 2.0", "dampening in [0, 1]"),
        bad({}, "required optimization parameter lr", "no lr anywhere"),
    ]


def errors_radam(device, dtype):
    return common_optimizers.optim_error_inputs_func_radam(device, dtype)


def entry(cls, inputs, errors, complex_ok):
    # foreach is the one global flag these classes have (no fused, no differentiable, no capturable)
    return OptimizerInfo(
        cls,
        optim_inputs_func=inputs,
        optim_error_inputs_func=errors,
        supported_impls=("foreach",),
        supports_complex=complex_ok,
    )


OPTIM_DB = [
    entry(hf_adamp.AdamP, inputs_adamp, errors_adamp, complex_ok=False),
    entry(hf_adamp.SGDP, inputs_sgdp, errors_sgdp, complex_ok=False),
    entry(hf_adamp.RAdam, inputs_radam, errors_radam, complex_ok=True),
]
DEVICE = "cpu"


def cases():
    """(info, OptimizerInput) for every input of every entry, foreach True and False."""
    for info in OPTIM_DB:
        for inp in info.optim_inputs_func(DEVICE):
            for foreach in (False, True):
                kwargs = {**inp.kwargs, "foreach": foreach}
                yield pytest.param(info, OptimizerInput(None, kwargs, inp.desc), id=f"{info.name}-{inp.desc}-{foreach}")


def error_cases():
    for info in OPTIM_DB:
        for err in info.optim_error_inputs_func(DEVICE, torch.float32):
            desc = err.optimizer_error_input.desc
            reason = SKIPS.get((info.name, desc))
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            yield pytest.param(info, err, id=f"{info.name}-{desc}", marks=marks)


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (3, 2, 3), (6,), (1, 7)]
    return [Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def fill_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def build(info, inp, params):
    return info.optim_cls(params, **copy.deepcopy(inp.kwargs))


def train(opt, params, steps, start=0):
    for s in range(start, start + steps):
        fill_grads(params, s)
        opt.step()


def assert_same(a, b, **tol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **tol)


# ----- errors -----
@pytest.mark.parametrize("info,err", list(error_cases()))
def test_errors(info, err):
    inp = err.optimizer_error_input
    params = inp.params if inp.params is not None else [Parameter(torch.randn(2, 2))]
    if err.error_on != OptimizerErrorEnum.CONSTRUCTION_ERROR:  # none of these lists has step errors
        pytest.fail(f"unexpected error stage {err.error_on}")
    if issubclass(err.error_type, Warning):
        with pytest.warns(err.error_type, match=err.error_regex):
            info.optim_cls(params, **inp.kwargs)
    else:
        with pytest.raises(err.error_type, match=err.error_regex):
            info.optim_cls(params, **inp.kwargs)


# ----- the step -----
@pytest.mark.parametrize("info,inp", [c for c in cases() if c.values[1].kwargs["foreach"]])
def test_foreach_matches_forloop(info, inp):
    results, projected = [], set()
    for foreach in (False, True):
        params = make_params()
        opt = build(info, inp, params) if foreach else info.optim_cls(params, **{**inp.kwargs, "foreach": False})
        train(opt, params, 6)
        results.append(params)
        if hasattr(opt, "projection_decisions"):
            projected |= set(opt.projection_decisions().values())
    assert_same(*results, rtol=1e-12, atol=1e-14)
    if info.name != "RAdam" and inp.kwargs.get("delta") == 1.0:
        assert projected & {"channel", "layer"}, "the inputs should make the projection happen"


@pytest.mark.parametrize("info,inp", list(cases()))
def test_goes_right_direction(info, inp):
    torch.manual_seed(0)
    weight = Parameter(torch.randn(10, 5, dtype=torch.float64))
    bias = Parameter(torch.randn(10, dtype=torch.float64))
    x = torch.randn(5, dtype=torch.float64)
    opt = build(info, inp, [weight, bias])

    def closure():
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        opt.step(closure)
    final = closure().item()
    assert final > initial if inp.kwargs.get("maximize") else final < initial


@pytest.mark.parametrize("info,inp", list(cases()))
def test_state_dict_round_trip_resumes_identically(info, inp):
    straight, resumed = make_params(), make_params()
    opt = build(info, inp, straight)
    train(opt, straight, 6)
    first = build(info, inp, resumed)
    train(first, resumed, 3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = build(info, inp, resumed)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second.state_dict()["param_groups"] == first.state_dict()["param_groups"]
    train(second, resumed, 3, start=3)
    assert_same(straight, resumed, rtol=0, atol=0)


@pytest.mark.parametrize("info,inp", list(cases()))
def test_deepcopy_and_pickle_step_identically(info, inp):
    params = make_params()
    opt = build(info, inp, params)
    train(opt, params, 2)
    # copied together with the parameters, so the copy's state is keyed by the copied parameters
    twins = [copy.deepcopy((opt, params)), pickle.loads(pickle.dumps((opt, params)))]
    for twin_opt, twin_params in twins:
        train(twin_opt, twin_params, 2, start=2)
    train(opt, params, 2, start=2)
    for _, twin_params in twins:
        assert_same(params, twin_params, rtol=0, atol=0)


@pytest.mark.parametrize("info,inp", list(cases()))
def test_step_hooks_and_state_dict_hooks_run(info, inp):
    params = make_params()
    opt = build(info, inp, params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    train(opt, params, 1)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]


@pytest.mark.parametrize("info,inp", list(cases()))
def test_param_groups_step_like_separate_optimizers(info, inp):
    # a second group with its own lr and weight decay steps as its own optimizer would
    together, apart = make_params(), make_params()
    kwargs = {k: v for k, v in inp.kwargs.items() if k != "lr"}
    lr = inp.kwargs.get("lr", 1e-3)
    lr = lr.item() if isinstance(lr, torch.Tensor) else lr
    second = dict(lr=lr * 3, weight_decay=0.2)
    opt = info.optim_cls([{"params": together[:2], "lr": lr}, {"params": together[2:], **second}], **kwargs)
    first_alone = info.optim_cls(apart[:2], **{**kwargs, "lr": lr})
    second_alone = info.optim_cls(apart[2:], **{**kwargs, **second})
    for s in range(4):
        fill_grads(together, s)
        fill_grads(apart, s)
        opt.step()
        first_alone.step()
        second_alone.step()
    assert_same(together, apart, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("info,inp", list(cases()))
def test_schedulers_drive_the_lr(info, inp):
    for make_scheduler in info.scheduler_inputs[0]:
        params = make_params()
        opt = build(info, inp, params)
        scheduler = make_scheduler(opt)
        for s in range(12):
            fill_grads(params, s)
            opt.step()
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(1.0)
            else:
                scheduler.step()
        assert all(torch.isfinite(p).all() for p in params)
        start = inp.kwargs.get("lr", opt.defaults["lr"])
        assert float(opt.param_groups[0]["lr"]) <= float(start)


@pytest.mark.parametrize("info,inp", [c for c in cases() if not isinstance(c.values[1].kwargs.get("lr"), torch.Tensor)])
@pytest.mark.parametrize("shape", [(), (1, 1)], ids=["0d", "1x1"])
def test_tensor_lr_steps_like_a_float(info, inp, shape):
    lr = inp.kwargs.get("lr", 1e-3)
    as_float, as_tensor = make_params(), make_params()
    train(info.optim_cls(as_float, **inp.kwargs), as_float, 3)
    kwargs = {**inp.kwargs, "lr": torch.full(shape, lr, dtype=torch.float64)}
    train(info.optim_cls(as_tensor, **kwargs), as_tensor, 3)
    assert_same(as_float, as_tensor, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("info,inp", list(cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lower_precision_tracks_float64(info, inp, dtype):
    wide = make_params()
    narrow = [Parameter(w.detach().to(dtype)) for w in wide]
    opt_wide, opt_narrow = build(info, inp, wide), build(info, inp, narrow)
    for s in range(3):
        fill_grads(wide, s)
        for p, w in zip(narrow, wide, strict=True):
            p.grad = w.grad.to(dtype)
        opt_wide.step()
        opt_narrow.step()
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for p, w in zip(narrow, wide, strict=True):
        assert p.dtype == dtype
        torch.testing.assert_close(p.double(), w, rtol=tol, atol=tol)


def strided_like(p):
    """``p``'s values in a non-contiguous parameter: transposed (2-D matrices), else every other element of a
    wider one."""
    if p.dim() == 2 and min(p.shape) > 1:
        out = torch.empty(p.shape[::-1], dtype=p.dtype).t()
    else:
        out = torch.empty(*p.shape[:-1], 2 * p.shape[-1], dtype=p.dtype)[..., ::2]
    return Parameter(out.copy_(p.detach()))


@pytest.mark.parametrize("info,inp", list(cases()))
def test_strided_params_step_like_contiguous_ones(info, inp):
    dense = make_params()
    strided = [strided_like(p) for p in dense]
    assert not any(p.is_contiguous() for p in strided)
    train(build(info, inp, dense), dense, 4)
    train(build(info, inp, strided), strided, 4)
    assert_same(strided, dense, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("info,inp", list(cases()))
def test_params_without_grads_are_left_alone(info, inp):
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = build(info, inp, params)
    opt.step()  # no gradients at all
    fill_grads(params[:1], 0)
    opt.step()  # one gradient
    assert_same(params[1:], before[1:], rtol=0, atol=0)
    assert set(opt.state) <= {params[0]}
    opt.zero_grad()
    assert params[0].grad is None


@pytest.mark.parametrize("info", OPTIM_DB, ids=lambda i: i.name)
def test_complex_parameters(info):
    z = Parameter(torch.randn(3, 3, dtype=torch.complex64))
    z.grad = torch.randn_like(z)
    kwargs = {"lr": 1e-2}
    if info.supports_complex:
        info.optim_cls([z], **kwargs).step()
        assert torch.isfinite(torch.view_as_real(z)).all()
    else:
        with pytest.raises(TypeError, match="complex"):
            info.optim_cls([z], **kwargs).step()


@pytest.mark.parametrize("info", OPTIM_DB, ids=lambda i: i.name)
def test_repr_lists_the_hyperparameters(info):
    opt = info.optim_cls(make_params(), lr=1e-2)
    text = repr(opt)
    assert info.name in text and "lr: 0.01" in text
