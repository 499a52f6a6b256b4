"""The Triton kernels of the GPU path (hf_adamp.kernels.triton_step), run on CPU tensors by Triton's interpreter.

The interpreter must be switched on before triton is first imported (triton's own helpers such as ``tl.sum``
are compiled at import time), and torch imports triton as soon as an optimizer steps. So the cases below run
in a fresh pytest process started by ``test_cases_under_the_interpreter``, with ``TRITON_INTERPRET=1`` and
``HF_ADAMP_TRITON_ON_CPU=1`` (which lets CPU tensors take the Triton path); in this process they are skipped.
The interpreter is slow: shapes are small and runs short.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import adamp
import pytest
import torch
from helpers import MODES, SHAPES, forced_grad, make_params, max_rel_err
from test_fused import check_half_precision_against_plain, run_maximize_pair, run_sharded
from test_parity import CONFIGS

import hf_adamp
from hf_adamp import kernels
from hf_adamp.optim.backends import triton as _triton

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
INNER = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get(_triton.ON_CPU_ENV) == "1"
inner = pytest.mark.skipif(not INNER, reason="runs in the interpreter subprocess (test_cases_under_the_interpreter)")
TOL = 1e-6  # fp32, as in test_parity


@pytest.mark.skipif(INNER, reason="this is the subprocess")
def test_cases_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", **{_triton.ON_CPU_ENV: "1"})
    env.pop(kernels.DISABLE_ENV, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).relative_to(ROOT))]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-3000:]


def test_cpu_step_never_imports_the_triton_kernels():
    """Without the test switch, CPU tensors keep the C++/eager path and hf_adamp never imports triton_step."""
    code = (
        "import sys, torch, hf_adamp\n"
        "p = torch.randn(4, 8, requires_grad=True); p.grad = torch.randn(4, 8)\n"
        "hf_adamp.AdamP([p], lr=0.1).step(); hf_adamp.SGDP([p], lr=0.1, momentum=0.9).step()\n"
        "assert 'hf_adamp.kernels.triton_step' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _triton.ON_CPU_ENV)}
    env["HF_ADAMP_DISABLE_FUSED"] = "1"  # no C++ build needed for this check
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


# ----- the cases (subprocess only) -----
class Spy:
    """Counts the Triton launches; serialises them (the interpreter patches triton.language while it runs)."""

    lock = threading.Lock()

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        module = _triton._module
        for name in ("adam_first", "adam_second", "sgd_first", "sgd_second"):
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, fn):
        def wrapped(*args):
            with self.lock:
                self.calls[name] = self.calls.get(name, 0) + 1
                return fn(*args)

        return wrapped

    def used(self, name: str) -> bool:
        return self.calls.get(f"{name}_first", 0) > 0 and self.calls.get(f"{name}_second", 0) > 0


@pytest.fixture
def spy(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    assert _triton.available()
    assert isinstance(_triton._module._adam_first, InterpretedFunction), "triton_step compiled, not interpreted"
    return Spy(monkeypatch)


def kind(name: str) -> str:
    return "adam" if name == "AdamP" else "sgd"


def step_all(params_sets, opts, mode, gen, skip=None):
    """One step of every optimizer on the same forced gradients (``skip``: indices without a gradient)."""
    for i, ps in enumerate(zip(*params_sets)):
        if skip is not None and i in skip:
            for p in ps:
                p.grad = None
            continue
        g = forced_grad(ps[0].detach(), mode, gen)
        for p in ps:
            p.grad = g.clone()
    for opt in opts:
        opt.step()


def groups_of(ps, kwargs, groups):
    if not groups:
        return ps
    return [{"params": ps[::2]}, {"params": ps[1::2], "lr": kwargs["lr"] * 0.5, "weight_decay": 0.02}]


@inner
@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "groups"])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_matches_plain_path_and_reference(spy, name, kwargs, groups):
    if groups and name == "SGDP" and kwargs.get("momentum", 0) == 0:
        pytest.skip("one SGDP config with groups is enough")
    base = make_params(dtype=torch.float32, seed=0)
    sets = [[p.clone().requires_grad_() for p in base] for _ in range(3)]
    ours = getattr(hf_adamp, name)(groups_of(sets[0], kwargs, groups), **kwargs)
    plain = getattr(hf_adamp, name)(groups_of(sets[1], kwargs, groups), foreach=False, **kwargs)
    ref = getattr(adamp, name)(groups_of(sets[2], kwargs, groups), **kwargs)
    gen = torch.Generator().manual_seed(1)
    seen: dict[int, set[str]] = {i: set() for i in range(len(base))}
    for step in range(12):
        step_all(sets, [ours, plain, ref], MODES[step % len(MODES)], gen, skip={step % 7})
        decisions = ours.projection_decisions()
        assert list(decisions.values()) == list(plain.projection_decisions().values())
        for i, p in enumerate(sets[0]):
            if p in decisions:
                seen[i].add(decisions[p])
    for shape, a, b, c in zip(SHAPES, *sets):
        assert max_rel_err(a.detach(), b.detach()) <= TOL, shape
        assert max_rel_err(a.detach(), c.detach()) <= TOL, shape
    assert seen[1] == seen[6] == {"channel", "layer", "none"}
    assert spy.used(kind(name))


@inner
@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[3], CONFIGS[4]])
def test_long_rows_through_partial_sums(spy, monkeypatch, name, kwargs):
    """Tiny tiles: every row spans many blocks, so the sums go through the partials and their reduction
    (which itself loops), as a row of millions of elements does on the GPU."""
    from hf_adamp.kernels import triton_step

    monkeypatch.setattr(triton_step, "TILE", 64)
    monkeypatch.setattr(triton_step, "MAX_BLOCK", 16)
    monkeypatch.setattr(triton_step, "REDUCE_BLOCK", 4)
    shapes = [(1, 300), (5, 70), (3, 16), (2, 5, 7), (33,)]
    base = make_params(shapes, dtype=torch.float32, seed=2)
    sets = [[p.clone().requires_grad_() for p in base] for _ in range(2)]
    opts = [getattr(hf_adamp, name)(sets[0], **kwargs), getattr(hf_adamp, name)(sets[1], foreach=False, **kwargs)]
    gen = torch.Generator().manual_seed(3)
    for step in range(8):
        step_all(sets, opts, MODES[step % len(MODES)], gen)
        assert list(opts[0].projection_decisions().values()) == list(opts[1].projection_decisions().values())
    for a, b in zip(*sets):
        assert max_rel_err(a.detach(), b.detach()) <= TOL
    assert spy.used(kind(name))


@inner
@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[4], CONFIGS[5]])
def test_maximize_matches_plain_path(spy, name, kwargs):
    """maximize=True on negated gradients takes the steps of the plain path on the gradients."""
    for a, b in zip(*run_maximize_pair(name, kwargs, torch.float32, steps=8)):
        assert max_rel_err(b.detach(), a.detach()) <= TOL
    assert spy.used(kind(name))


@inner
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[3]])
def test_half_precision_matches_plain_path(spy, name, kwargs, dtype):
    """fp32 state and arithmetic, rounded once into the weight: each step lands at most one rounding away from
    the plain path's (see test_fused)."""
    check_half_precision_against_plain(name, kwargs, dtype, steps=8)
    assert spy.used(kind(name))


@inner
@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[3], CONFIGS[4]])
def test_sharded_partial_rows_match_reference(spy, name, kwargs):
    """Two simulated ranks whose shards cut rows (see test_fused): partial-row runs, one reduction."""
    ours, expected, opts = run_sharded(name, kwargs, torch.float32, steps=12)
    assert max_rel_err(ours, expected) <= TOL
    assert opts[0].projection_decisions() == opts[1].projection_decisions()
    assert spy.used(kind(name))


@inner
def test_disable_env_turns_the_triton_path_off(spy, monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    p = torch.randn(4, 8, requires_grad=True)
    p.grad = torch.randn(4, 8)
    hf_adamp.AdamP([p], lr=0.1).step()
    assert not spy.calls


@inner
def test_cpu_tensors_need_the_test_switch(spy, monkeypatch):
    monkeypatch.delenv(_triton.ON_CPU_ENV)
    monkeypatch.setattr(kernels, "available", lambda: False)  # the eager path, without building the C++ kernels
    p = torch.randn(4, 8, requires_grad=True)
    p.grad = torch.randn(4, 8)
    hf_adamp.SGDP([p], lr=0.1, momentum=0.9).step()
    assert not spy.calls


@inner
@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_inf_weight_element_stays_inf(spy, name):
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    base[1, 3] = float("inf")
    p, r = base.clone().requires_grad_(), base.clone().requires_grad_()
    kw = dict(lr=0.01, weight_decay=0.1) if name == "AdamP" else dict(lr=0.01, momentum=0.9, weight_decay=0.1)
    ours, ref = getattr(hf_adamp, name)([p], **kw), getattr(adamp, name)([r], **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        g = torch.randn(base.shape, generator=gen)
        p.grad, r.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert spy.used(kind(name))
    assert torch.isinf(r[1, 3]) and torch.equal(torch.isnan(p), torch.isnan(r))
    torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)


def test_triton_is_opt_in_on_cuda(monkeypatch):
    """CUDA tensors take the Triton kernels only with HF_ADAMP_TRITON=1 (not yet run on a GPU); CPU tensors
    only under the test interpreter."""
    from hf_adamp.optim.backends import triton as _triton

    for var in (_triton.OPT_IN_ENV, _triton.ON_CPU_ENV, "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not _triton.wanted_on(cuda) and not _triton.wanted_on(cpu)
    monkeypatch.setenv(_triton.OPT_IN_ENV, "1")
    assert _triton.wanted_on(cuda) and not _triton.wanted_on(cpu)
    monkeypatch.setenv(_triton.ON_CPU_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _triton.wanted_on(cpu)
