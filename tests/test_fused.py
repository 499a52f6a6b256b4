"""The fused CPU kernels (hf_adamp.kernels) against the reference and the eager path, and the fallback.

Every test that takes the ``path`` fixture runs three times: on the fused kernels (which must build wherever a C++
compiler exists) with speculation (the default) and without (HF_ADAMP_SPECULATE=0), and on the eager path
forced by HF_ADAMP_DISABLE_FUSED=1.
"""

from __future__ import annotations

import logging
import threading

import adamp
import pytest
import torch
from helpers import MODES, SHAPES, forced_grad, make_params, max_rel_err
from test_parity import CONFIGS, TOL, run_pair

import hf_adamp
from hf_adamp import kernels, projection
from hf_adamp.optim import _step
from hf_adamp.optim.backends import cpu as cpu_backend
from hf_adamp.optim.backends import eager
from hf_adamp.sharding import Layout, ParamSpec, Piece


class KernelSpy:
    """Counts kernel calls, and the pass-2 runs that repaired a speculated step."""

    def __init__(self, module):
        self.module, self.calls, self.repairs = module, 0, 0
        self.pass1_modes: set[int] = set()

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def wrapped(*args):
            out = fn(*args)
            if name == "decide":
                return out
            self.calls += 1
            modes = args[1][:, 4].tolist()  # the runs table: tensor, start, rows, len, mode, stats row, slot
            if name.endswith("_first"):
                self.pass1_modes.update(modes)
            if name.endswith("_second"):  # out: rows written per run; modes other than APPLY repair
                self.repairs += sum(1 for mode, n in zip(modes, out.tolist()) if mode != cpu_backend.APPLY and n > 0)
            return out

        return wrapped


@pytest.fixture(params=["fused", "fused-two-pass", "eager"])
def path(request, monkeypatch):
    """Yields a KernelSpy on the fused paths (speculating, the default, or two-pass), None on the eager path."""
    if request.param == "eager":
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
        yield None
        return
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    speculating = request.param == "fused"
    if speculating:
        monkeypatch.delenv(_step.SPECULATE_ENV, raising=False)
    else:
        monkeypatch.setenv(_step.SPECULATE_ENV, "0")
    if kernels._compiler() is None:
        pytest.skip("no C++ compiler: the fused kernels cannot be built here")
    assert kernels.available(), "a compiler exists, so the fused kernels must build"
    spy = KernelSpy(kernels.module())
    spy.speculating = speculating
    monkeypatch.setattr(kernels, "module", lambda: spy)
    yield spy


def spied_kernels(monkeypatch):
    """The fused kernels, built (skips where no compiler exists), behind a spy."""
    if kernels._compiler() is None:
        pytest.skip("no C++ compiler: the fused kernels cannot be built here")
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    assert kernels.available()
    spy = KernelSpy(kernels.module())
    monkeypatch.setattr(kernels, "module", lambda: spy)
    return spy


def check_used(spy):
    if spy is not None:
        assert spy.calls > 0, "the fused kernels were not called"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_matches_reference(path, name, kwargs, dtype):
    ours, ref, seen = run_pair(name, kwargs, dtype, True)
    for a, b in zip(ours, ref):
        assert max_rel_err(a.detach(), b.detach()) <= TOL[dtype]
    assert seen[1] == {"channel", "layer", "none"}
    check_used(path)
    if path is not None and path.speculating:
        assert path.repairs > 0, "the outcomes change every step, so some speculated steps must be repaired"
    elif path is not None:
        assert path.repairs == 0, "without speculation nothing is ever repaired"


@pytest.mark.parametrize("outcome", ["channel", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name,kwargs", [CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[4], CONFIGS[5]])
def test_right_guess_is_bit_identical_to_two_passes(monkeypatch, name, kwargs, dtype, outcome):
    """While a parameter keeps its outcome, the one-pass speculating step gives exactly the two-pass step's bits,
    parameters and state alike, and nothing is repaired."""
    spy = spied_kernels(monkeypatch)
    base = make_params(dtype=dtype, seed=9)
    runs = []
    for speculate in ("1", "0"):
        monkeypatch.setenv(_step.SPECULATE_ENV, speculate)
        ps = [p.clone().requires_grad_() for p in base]
        opt = getattr(hf_adamp, name)(ps, **kwargs)
        gen = torch.Generator().manual_seed(5)
        for _ in range(8):
            for p in ps:
                p.grad = forced_grad(p.detach(), outcome, gen)
            opt.step()
        assert set(opt.projection_decisions().values()) == {outcome}
        runs.append((ps, opt))
        if speculate == "1":
            assert (cpu_backend.SPEC_CHANNEL if outcome == "channel" else cpu_backend.SPEC) in spy.pass1_modes
            assert spy.repairs == 0
    (ps_a, opt_a), (ps_b, opt_b) = runs
    for a, b in zip(ps_a, ps_b):
        assert torch.equal(a, b)
        for key, value in opt_b.state[b].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(opt_a.state[a][key], value), key


# outcome sequences whose changes make pass 2 repair every kind of wrong guess (after two layer projections in a
# row a parameter takes the two passes, so "layer" never comes twice before a change)
_SWITCHES = ("none", "none", "layer", "none", "channel", "channel", "layer", "channel", "none", "channel")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_wrong_guess_is_repaired_to_the_two_pass_step(monkeypatch, name, kwargs, dtype):
    """A repaired step is within a few roundings of the two-pass step, per row, parameters and state alike.

    Two optimizers (speculating, and two passes) start every step from the same weights and state, so each
    step's difference is its own."""
    spy = spied_kernels(monkeypatch)
    eps = torch.finfo(dtype).eps
    base = make_params(dtype=dtype, seed=13)
    a_ps, b_ps = ([p.clone().requires_grad_() for p in base] for _ in range(2))
    opt_a, opt_b = (getattr(hf_adamp, name)(ps, **kwargs) for ps in (a_ps, b_ps))
    gen = torch.Generator().manual_seed(3)

    def tensors(opt, ps):  # per parameter: the weight and its state tensors
        state = [[v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.dim()] for p in ps]
        return [[p.detach()] + s for p, s in zip(ps, state)]

    def rows(t):
        return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)

    for outcome in _SWITCHES:
        before = [[t.clone() for t in ts] for ts in tensors(opt_b, b_ps)]
        for a, b in zip(a_ps, b_ps):
            a.grad = b.grad = forced_grad(b.detach(), outcome, gen)
        monkeypatch.setenv(_step.SPECULATE_ENV, "1")
        opt_a.step()
        monkeypatch.setenv(_step.SPECULATE_ENV, "0")
        opt_b.step()
        for ta, tb, t0 in zip(tensors(opt_a, a_ps), tensors(opt_b, b_ps), before):
            for x, y, old in zip(ta, tb, t0):  # the first step's state is new: only its weights are compared
                scale = rows(y).abs().amax(1, keepdim=True) + rows(old).abs().amax(1, keepdim=True)
                assert ((rows(x) - rows(y)).abs() <= 4 * eps * scale).all(), outcome
                x.copy_(y)  # the next step starts from the same weights and state
    assert spy.repairs > 0
    assert {cpu_backend.SPEC, cpu_backend.SPEC_CHANNEL} <= set(spy.pass1_modes)


def test_guess_is_kept_in_state_and_resumes_bit_identically(monkeypatch):
    """The guess lives in the state dict: a resumed run speculates, repairs and rounds like an uninterrupted one,
    here with the outcome changing every step (so most steps repair)."""
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.delenv(_step.SPECULATE_ENV, raising=False)
    if not kernels.available():
        pytest.skip("the fused kernels are unavailable here")
    base = make_params(dtype=torch.float32, seed=11)

    def train(opt, ps, steps, start):
        for step in range(start, start + steps):
            gen = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = forced_grad(p.detach(), MODES[step % len(MODES)], gen)
            opt.step()

    straight = [p.clone().requires_grad_() for p in base]
    opt = hf_adamp.AdamP(straight, lr=1e-2, weight_decay=0.1)
    train(opt, straight, 10, 0)
    saved = torch.load(_roundtrip(opt.state_dict()), weights_only=True)
    multi_dim = [i for i, p in enumerate(base) if p.dim() > 1]
    assert all(isinstance(saved["state"][i].get(_step.MEMORY_KEY), list) for i in multi_dim)
    resumed = [p.detach().clone().requires_grad_() for p in straight]
    train(opt, straight, 10, 10)
    second = hf_adamp.AdamP(resumed, lr=1e-2, weight_decay=0.1)
    second.load_state_dict(saved)
    train(second, resumed, 10, 10)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[4], CONFIGS[5]])
def test_small_chunks_and_groups(path, monkeypatch, name, kwargs):
    monkeypatch.setattr(eager, "CHUNK_ELEMS", 50)
    ours, ref, _ = run_pair(name, kwargs, torch.float64, True, steps=20, groups=True)
    for a, b in zip(ours, ref):
        assert max_rel_err(a.detach(), b.detach()) <= 1e-12
    check_used(path)


def check_half_precision_against_plain(
    name, kwargs, dtype, steps, shapes=SHAPES, device="cpu", outcomes=None, cancellation_slack=False
):
    """fp32 state and arithmetic for half weights: each step, the fast path rounds the same fp32 values as the
    plain one (weights re-synchronised after every step, so that one-ulp rounding differences do not grow).
    ``outcomes``: a set that collects the fast path's projection outcomes of every step. ``cancellation_slack``:
    also allow the fp32 arithmetic's own rounding where a step nearly cancels a weight, and the subnormal spacing
    (needed on long rows, where both occur)."""
    base = make_params(shapes, dtype=torch.float32, seed=4, device=device)
    plain, fast = ([p.to(dtype).requires_grad_() for p in base] for _ in range(2))
    opts = [getattr(hf_adamp, name)(ps, foreach=foreach, **kwargs) for ps, foreach in ((plain, False), (fast, True))]
    gen = torch.Generator().manual_seed(2)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    subnormal_spacing = torch.finfo(dtype).smallest_normal * 2 * ulp
    # where a step nearly cancels a weight, the fp32 values differ by their own rounding, relative to the old weight
    fp32_noise = 8 * torch.finfo(torch.float32).eps
    for step in range(steps):
        old = [a.detach().float() for a in plain]
        for a, b in zip(plain, fast):
            a.grad = forced_grad(a.detach().float(), MODES[step % 4], gen).to(dtype)
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
        if outcomes is not None:
            outcomes.update(opts[1].projection_decisions().values())
        for a, b, before in zip(plain, fast, old):
            x, y = a.detach().float(), b.detach().float()
            bound = 2 * ulp * x.abs()
            if cancellation_slack:
                bound = bound + subnormal_spacing + fp32_noise * before.abs()
            assert ((x - y).abs() <= bound).all()  # at most one rounding apart
            b.data.copy_(a.data)
    for a, b in zip(plain, fast):
        for key, value in opts[0].state[a].items():
            if isinstance(value, torch.Tensor) and value.dim():
                assert value.dtype == opts[1].state[b][key].dtype == torch.float32
                assert max_rel_err(opts[1].state[b][key], value) <= 1e-5, key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[3], CONFIGS[4]])
def test_half_precision_matches_plain_path(path, name, kwargs, dtype):
    check_half_precision_against_plain(name, kwargs, dtype, steps=16)
    check_used(path)


def run_maximize_pair(name, kwargs, dtype, steps, device="cpu", outcomes=None):
    """The plain path on forced gradients, and the fast path with maximize=True on their negation: returns
    both parameter lists (plain first). ``outcomes``: a set that collects the fast path's outcomes."""
    base = make_params(dtype=dtype, seed=6, device=device)
    runs = []
    for foreach, maximize in ((False, False), (True, True)):
        ps = [p.clone().requires_grad_() for p in base]
        opt = getattr(hf_adamp, name)(ps, foreach=foreach, maximize=maximize, **kwargs)
        gen = torch.Generator().manual_seed(8)
        for step in range(steps):
            for p in ps:
                g = forced_grad(p.detach(), MODES[step % 4], gen)
                p.grad = -g if maximize else g
            opt.step()
            if maximize and outcomes is not None:
                outcomes.update(opt.projection_decisions().values())
        runs.append(ps)
    return runs


@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[2], CONFIGS[4], CONFIGS[5]])
def test_maximize_matches_plain_path(path, name, kwargs):
    """maximize=True on negated gradients takes the same steps as the plain path on the gradients."""
    for a, b in zip(*run_maximize_pair(name, kwargs, torch.float64, steps=20)):
        assert max_rel_err(b.detach(), a.detach()) <= 1e-12
    check_used(path)


# ----- sharded: rows cut by shard boundaries, sums reduced across simulated ranks -----
SHARD_SHAPES = [(7, 5), (6,), (16, 24), (3, 300), (4, 3, 3, 3), (9,)]


class ThreadReducer:
    """All-reduce (sum) of the statistics buffer between ranks that are threads of this process."""

    def __init__(self, ranks: int) -> None:
        self.bufs: list[torch.Tensor | None] = [None] * ranks
        self.barrier = threading.Barrier(ranks, timeout=300)  # a rank that failed must not hang the others

    def for_rank(self, rank: int):
        def reduce(stats: torch.Tensor) -> None:
            self.bufs[rank] = stats.clone()
            self.barrier.wait()
            total = sum(self.bufs)
            self.barrier.wait()
            stats.copy_(total)

        return reduce


def shard(shapes, bounds):
    """A Layout per rank: the flat concatenation of all parameters, cut at ``bounds``."""
    specs = [ParamSpec(s, name=f"p{i}") for i, s in enumerate(shapes)]
    offsets, total = [], 0
    for spec in specs:
        offsets.append(total)
        total += spec.numel
    edges = [0, *bounds, total]
    layouts = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        pieces = []
        for i, spec in enumerate(specs):
            a, b = max(lo, offsets[i]), min(hi, offsets[i] + spec.numel)
            if a < b:
                pieces.append(Piece(i, a - lo, a - offsets[i], b - a))
        layouts.append((lo, hi, specs, pieces))
    return layouts, total


def run_sharded(name, kwargs, dtype, steps, device="cpu", outcomes=None):
    """Two simulated ranks whose shards cut rows, against the reference on the whole parameters: returns our
    concatenated shards, the reference's weights, and the ranks' optimizers. ``outcomes``: a set that collects
    the first rank's outcomes of every step."""
    # (7, 5) ends at 35; 35 + 6 = 41 starts (16, 24): cut inside row 3 of it, and inside a row of (3, 300)
    bounds = [41 + 3 * 24 + 10, 41 + 384 + 450]
    shards, total = shard(SHARD_SHAPES, bounds)
    base = make_params(SHARD_SHAPES, dtype=dtype, seed=7, device=device)
    ref = [p.clone().requires_grad_() for p in base]
    ref_opt = getattr(adamp, name)(ref, **kwargs)
    full = torch.cat([p.reshape(-1) for p in base])
    reducer = ThreadReducer(len(shards))
    locals_, opts = [], []
    for rank, (lo, hi, specs, pieces) in enumerate(shards):
        local = full[lo:hi].clone().requires_grad_()
        opt = getattr(hf_adamp, name)([local], **kwargs)
        opt.attach_layout(Layout(specs, {id(local): pieces}), reducer.for_rank(rank))
        locals_.append(local)
        opts.append(opt)
    gen = torch.Generator().manual_seed(3)
    for step in range(steps):
        grads = [forced_grad(p.detach(), MODES[step % len(MODES)], gen) for p in ref]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
        for local, (lo, hi, _, _) in zip(locals_, shards):
            local.grad = flat_grad[lo:hi].clone()
        threads = [threading.Thread(target=opt.step) for opt in opts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ref_opt.step()
        if outcomes is not None:
            outcomes.update(opts[0].projection_decisions().values())
    ours = torch.cat([local.detach() for local in locals_])
    assert ours.numel() == total
    return ours, torch.cat([p.detach().reshape(-1) for p in ref]), opts


@pytest.mark.parametrize("name,kwargs", [CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[4]])
def test_sharded_partial_rows_match_reference(path, name, kwargs):
    ours, expected, opts = run_sharded(name, kwargs, torch.float64, steps=24)
    assert max_rel_err(ours, expected) <= 1e-12
    assert opts[0].projection_decisions() == opts[1].projection_decisions()  # every rank decides alike
    check_used(path)


# ----- fallback -----
def test_fallback_without_compiler_logs_once_and_matches_reference(monkeypatch, caplog):
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failed", None)
    monkeypatch.setattr(kernels, "_compiler", lambda: None)

    def no_build():
        raise AssertionError("must not try to build without a compiler")

    monkeypatch.setattr(kernels, "_build", no_build)
    with caplog.at_level(logging.WARNING, logger="hf_adamp.kernels"):
        assert not kernels.available()
        assert not kernels.available()
        ours, ref, _ = run_pair(*CONFIGS[1], torch.float32, True, steps=12)
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_adamp.kernels"]
    assert len(lines) == 1 and "no C++ compiler" in lines[0], lines
    for a, b in zip(ours, ref):
        assert max_rel_err(a.detach(), b.detach()) <= 1e-6


def test_build_failure_falls_back(monkeypatch, caplog):
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failed", None)
    monkeypatch.setattr(kernels, "_compiler", lambda: "/usr/bin/c++")

    def broken():
        raise RuntimeError("Error building extension 'hf_adamp_cpu'")

    monkeypatch.setattr(kernels, "_build", broken)
    with caplog.at_level(logging.WARNING, logger="hf_adamp.kernels"):
        assert not kernels.available()
    assert any("build failed" in r.getMessage() for r in caplog.records)


def test_env_var_disables(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert not kernels.available()
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    assert kernels.available() == (kernels._compiler() is not None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_kernel_decision_matches_projection_decide(dtype):
    """The C++ decision (used with the CPU kernels) against projection.decide on sums of forced gradients: the
    same outcomes for every slot, coefficients and norms to rounding."""
    if not kernels.available():
        pytest.skip("the fused kernels are unavailable here")
    shapes = [(7, 5), (1, 40), (9, 1), (3, 3000), (16, 24), (4, 3, 3, 3)] * 4
    gen = torch.Generator().manual_seed(0)
    params = make_params(shapes, dtype=dtype, seed=3)
    blocks = []
    for i, p in enumerate(params):
        g = forced_grad(p, MODES[i % len(MODES)], gen)
        rows = p.shape[0]
        g2, p2 = g.reshape(rows, -1), p.reshape(rows, -1)
        u = torch.randn(p2.shape, generator=gen, dtype=dtype)
        blocks.append(torch.stack([(g2 * p2).sum(1), (g2 * g2).sum(1), (p2 * p2).sum(1), (p2 * u).sum(1)]))
    blocks.append(torch.zeros(4, 5, dtype=dtype))  # a slot of zero rows: zero gradient and weight
    stats = torch.cat(blocks, dim=1).contiguous()
    counts = torch.tensor([b.shape[1] for b in blocks])
    row_len = [float(p[0].numel()) for p in params] + [3.0]
    numel = [float(p.numel()) for p in params] + [15.0]
    slots = len(blocks)
    delta, eps = [0.1] * slots, [1e-8] * slots
    ref = projection.decide(
        stats, torch.repeat_interleave(counts), *(torch.tensor(x, dtype=dtype) for x in (row_len, numel, delta, eps))
    )
    f64 = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    got = projection.Decision(*kernels.module().decide(stats, counts, f64(row_len), f64(numel), f64(delta), f64(eps)))
    assert torch.equal(got.kind, ref.kind) and torch.equal(got.projected, ref.projected)
    assert set(got.kind.tolist()) == {projection.NONE, projection.CHANNEL, projection.LAYER}
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert max_rel_err(got.coef, ref.coef) <= tol
    assert max_rel_err(got.weight_norm, ref.weight_norm) <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_rounding_matches_torch(dtype):
    """The kernels' own fp16/bf16 conversions round like torch's: every finite half (and the infinities and a
    NaN) times a few factors, stepped by a plain SGD step (lr 0, so the weight becomes weight * decay), gives
    torch's bits, through subnormals, ties and overflow."""
    if not kernels.available():
        pytest.skip("the fused kernels are unavailable here")
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    weights = bits.view(dtype)
    weights = weights[~weights.isnan()]
    weights = torch.cat([weights, torch.tensor([float("nan")], dtype=dtype)])
    n = weights.numel()
    for decay in (1.0, 1.0001, 0.3, 3.7, 1e-3, 1e4):
        p = weights.clone()
        tensors = [torch.zeros(n, dtype=dtype), p, torch.zeros(n)]  # grad, weight, momentum buffer
        runs = torch.tensor([[0, 0, 1, n, cpu_backend.FULL, 0, -1]])
        scalars = torch.tensor([[0.0, 0.0, 0.0, decay, 1e-8, 0.0, 0.0]], dtype=torch.float64)
        kernels.module().sgd_first(tensors, runs, scalars, torch.zeros(4, 1), torch.zeros(1))
        expected = (weights.float() * torch.tensor(decay, dtype=torch.float32)).to(dtype)
        nan = expected.isnan()
        assert torch.equal(p.isnan(), nan), decay
        assert torch.equal(p[~nan].view(torch.int16), expected[~nan].view(torch.int16)), decay


def test_tensor_table_checks_gradients_always_and_swapped_storage_again():
    """A table made with the step before's checks each gradient against its parameter, and a whole set again
    once its parameter or state has other storage (``p.data = ...``); its pointers are always read anew."""
    if not kernels.available():
        pytest.skip("the fused kernels are unavailable here")
    p, m = torch.randn(6, 4), torch.zeros(6, 4)
    table = kernels.TensorTable([torch.randn(6, 4), p, m], 3)
    with pytest.raises(RuntimeError, match="laid out unlike the parameter"):
        kernels.TensorTable([torch.randn(4, 6).t(), p, m], 3, table)
    m.data = torch.zeros(6, 4)  # same layout, new memory: accepted, at its new address
    again = kernels.TensorTable([torch.randn(6, 4), p, m], 3, table)
    assert again.ptrs[2] == m.data_ptr() != table.ptrs[2]
    m.data = torch.zeros(4, 6).t()  # the same shape, but transposed in memory: the set is checked again
    with pytest.raises(RuntimeError, match="laid out unlike the parameter"):
        kernels.TensorTable([torch.randn(6, 4), p, m], 3, again)
    with pytest.raises(RuntimeError, match="sets of 4"):
        kernels.module().adam_first(
            again, torch.zeros(0, 7, dtype=torch.int64), torch.zeros(0, 8).double(), torch.zeros(4, 1), torch.zeros(1)
        )


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_step_after_storage_swap_lands_in_the_new_storage(monkeypatch, name):
    """Weights and state given new memory between steps (the tensors stay the same objects, the old memory stays
    alive): the kernels' kept tables step the new memory, as the eager path does."""
    if not kernels.available():
        pytest.skip("the fused kernels are unavailable here")
    results = []
    for disabled in (False, True):
        if disabled:
            monkeypatch.setenv(kernels.DISABLE_ENV, "1")
        else:
            monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(5))]
        make = hf_adamp.AdamP if name == "adamp" else hf_adamp.SGDP
        opt = make(params, lr=0.1, weight_decay=0.1, **({} if name == "adamp" else {"momentum": 0.9}))
        old = []  # the replaced memory, kept alive so that a stale pointer would write there unnoticed
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
            for t in [*params, *(v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor))]:
                old.append(t.data)
                t.data = t.data.clone()
        results.append([p.detach().clone() for p in params])
    for fused, plain in zip(*results):
        assert max_rel_err(fused, plain) <= 1e-5
