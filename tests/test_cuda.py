"""The Triton path on a CUDA device: parity, and steps free of host syncs and of recompilation.

The tests marked ``cuda`` need a GPU and are skipped without one; ``benchmarks/gpu_check.py`` runs them with
``python -m pytest -m cuda tests/test_cuda.py``. The Triton path is opt-in on CUDA (``HF_ADAMP_TRITON=1``, which
the ``launches`` fixture sets), and every parity test checks that it was taken and that the forced gradients
produced all three projection outcomes.

Without a GPU, ``HF_ADAMP_CUDA_TESTS_ON_CPU=1`` (with ``TRITON_INTERPRET=1`` and ``HF_ADAMP_TRITON_ON_CPU=1``, all
set before python starts) runs the same tests on CPU tensors through Triton's interpreter: slow, so the largest
shapes are left out there, and so are the sync and recompilation checks, which need CUDA itself.
``test_a_few_cases_under_the_interpreter`` runs a small subset that way on every machine.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import adamp
import pytest
import torch
from helpers import MODES, expected_outcomes, forced_grad, make_params, max_rel_err
from test_fused import check_half_precision_against_plain, run_maximize_pair, run_sharded
from test_parity import CONFIGS, TOL
from test_triton import Spy, kind, step_all

import hf_adamp
from hf_adamp import kernels
from hf_adamp.optim.backends import triton as _triton

ROOT = Path(__file__).resolve().parents[1]
ON_CPU_SWITCH = "HF_ADAMP_CUDA_TESTS_ON_CPU"
INTERPRETER_ENV = {"TRITON_INTERPRET": "1", "HF_ADAMP_TRITON_ON_CPU": "1"}
ON_CPU = os.environ.get(ON_CPU_SWITCH) == "1"
if ON_CPU and any(os.environ.get(k) != v for k, v in INTERPRETER_ENV.items()):
    raise RuntimeError(f"{ON_CPU_SWITCH}=1 needs {INTERPRETER_ENV} in the environment before python starts")
DEVICE = torch.device("cpu" if ON_CPU else "cuda")
OPT_IN_ENV = "HF_ADAMP_TRITON_ON_CPU" if ON_CPU else "HF_ADAMP_TRITON"  # lets DEVICE's tensors take the path

_needs_device = pytest.mark.skipif(
    not ON_CPU and not torch.cuda.is_available(),
    reason=f"no CUDA device (torch {torch.__version__}); {ON_CPU_SWITCH}=1 runs these through Triton's interpreter",
)
needs_cuda_itself = pytest.mark.skipif(ON_CPU, reason="needs CUDA itself, not Triton's interpreter")
too_large_for_interpreter = pytest.mark.skipif(ON_CPU, reason="too large for Triton's interpreter")


def cuda(test):
    """Marks a test ``cuda`` and skips it where there is neither a GPU nor the interpreter switch."""
    return pytest.mark.cuda(_needs_device(test))


CONFIG_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CONFIGS)]
SHAPE_SETS = [
    # 1-D, 2-D, conv, one row, one column
    pytest.param([(6,), (7, 5), (4, 3, 3, 3), (1, 40), (9, 1), (16, 24)], id="small"),
    # rows wider than a block (1024): their sums go through partial sums
    pytest.param([(3, 3000), (1, 70_000), (33,)], id="long-rows"),
    # GPT-2-small's shapes: a (512, 768) block of its embedding, a bias, a (1, n) weight
    pytest.param([(512, 768), (768,), (1, 768)], id="gpt2", marks=too_large_for_interpreter),
    # over 256 blocks per row: the reduction of the partial sums loops
    pytest.param([(2, 1_500_000)], id="huge-rows", marks=too_large_for_interpreter),
]
ALL_SHAPES = [shape for param in SHAPE_SETS for shape in param.values[0]]
ALL_OUTCOMES = {"channel", "layer", "none"}
FP32_TOL = TOL[torch.float32]  # relative to the largest weight
STEPS = 12  # three rounds of the forced outcomes


@pytest.fixture
def launches(monkeypatch) -> Spy:
    """Opts DEVICE's tensors into the Triton path and counts its launches (test_triton.Spy wraps the kernel
    functions that the backend module, hf_adamp.optim.backends.triton, holds). The one place these tests touch it."""
    monkeypatch.setenv(OPT_IN_ENV, "1")
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    assert _triton.available(), "triton does not import here: the Triton path cannot run"
    return Spy(monkeypatch)


def total(spy: Spy) -> int:
    return sum(spy.calls.values())


def assert_triton_path_taken(spy: Spy, name: str) -> None:
    assert spy.used(kind(name)), f"{name} did not take the Triton path (launches: {spy.calls})"


def reference_tol(shapes: list[tuple[int, ...]]) -> float:
    """adamp takes its cosine similarities from fp32 norms of whole rows: over a million elements their rounding
    alone moves the weights by a few 1e-6 (adamp and the plain path differ by 3.3e-6 on a (2, 1.5M) weight)."""
    widest_row = max(math.prod(shape[1:]) for shape in shapes)
    return 1e-5 if widest_row > 1_000_000 else FP32_TOL


# ------------------------------------------------------------------------------------------------------- parity
@cuda
@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_fp32_matches_plain_path_and_reference(launches, name, kwargs, shapes):
    base = make_params(shapes, dtype=torch.float32, seed=0, device=DEVICE)
    sets = [[p.clone().requires_grad_() for p in base] for _ in range(3)]
    ours = getattr(hf_adamp, name)(sets[0], **kwargs)
    plain = getattr(hf_adamp, name)(sets[1], foreach=False, **kwargs)
    ref = getattr(adamp, name)(sets[2], **kwargs)
    gen = torch.Generator().manual_seed(1)
    seen: list[set[str]] = [set() for _ in shapes]
    for step in range(STEPS):
        step_all(sets, [ours, plain, ref], MODES[step % len(MODES)], gen, skip={step % 7})
        decisions = ours.projection_decisions()
        assert list(decisions.values()) == list(plain.projection_decisions().values()), step
        for i, p in enumerate(sets[0]):
            if p in decisions:
                seen[i].add(decisions[p])
    for shape, a, b, c in zip(shapes, *sets):
        assert max_rel_err(a.detach(), b.detach()) <= FP32_TOL, (shape, "against the plain path")
        assert max_rel_err(a.detach(), c.detach()) <= reference_tol(shapes), (shape, "against adamp")
    for shape, outcomes in zip(shapes, seen):
        assert outcomes == expected_outcomes(shape), shape
    assert set().union(*seen) == ALL_OUTCOMES
    assert_triton_path_taken(launches, name)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_half_precision_matches_plain_path(launches, name, kwargs, shapes, dtype):
    """fp32 state and arithmetic, rounded once into the weight: each step at most one rounding away from the
    plain path's (see test_fused)."""
    seen: set[str] = set()
    check_half_precision_against_plain(
        name, kwargs, dtype, STEPS, shapes=shapes, device=DEVICE, outcomes=seen, cancellation_slack=True
    )
    assert seen == ALL_OUTCOMES
    assert_triton_path_taken(launches, name)


@cuda
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_sharded_partial_rows_match_reference(launches, name, kwargs):
    """Two simulated ranks (threads) whose shards cut rows (see test_fused): partial-row runs, one reduction."""
    seen: set[str] = set()
    ours, expected, opts = run_sharded(name, kwargs, torch.float32, STEPS, device=DEVICE, outcomes=seen)
    assert max_rel_err(ours, expected) <= FP32_TOL
    assert opts[0].projection_decisions() == opts[1].projection_decisions()
    assert seen == ALL_OUTCOMES
    assert_triton_path_taken(launches, name)


@cuda
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_maximize_matches_plain_path(launches, name, kwargs):
    """maximize=True on negated gradients takes the steps of the plain path on the gradients."""
    seen: set[str] = set()
    plain, ours = run_maximize_pair(name, kwargs, torch.float32, STEPS, device=DEVICE, outcomes=seen)
    for a, b in zip(plain, ours):
        assert max_rel_err(b.detach(), a.detach()) <= FP32_TOL
    assert seen == ALL_OUTCOMES
    assert_triton_path_taken(launches, name)


@cuda
@pytest.mark.parametrize("name,kwargs", [CONFIGS[1], CONFIGS[4]], ids=[CONFIG_IDS[1], CONFIG_IDS[4]])
def test_without_the_opt_in_the_eager_path_steps(launches, monkeypatch, name, kwargs):
    """Without the opt-in, the default path steps DEVICE's tensors, correctly, and never launches a Triton kernel."""
    monkeypatch.delenv(OPT_IN_ENV)
    base = make_params(SHAPE_SETS[0].values[0], dtype=torch.float32, seed=3, device=DEVICE)
    sets = [[p.clone().requires_grad_() for p in base] for _ in range(2)]
    opts = [getattr(hf_adamp, name)(sets[0], **kwargs), getattr(hf_adamp, name)(sets[1], foreach=False, **kwargs)]
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        step_all(sets, opts, MODES[step], gen)
    for a, b in zip(*sets):
        assert max_rel_err(a.detach(), b.detach()) <= FP32_TOL
    assert total(launches) == 0, launches.calls


# ------------------------------------------------------------------------------------- no sync, no recompilation
def warmed_up(name: str, kwargs: dict) -> tuple[torch.optim.Optimizer, list[torch.Tensor], list[list[torch.Tensor]]]:
    """An optimizer over every shape, after three steps (compilation, state creation), with the gradients of five
    more steps ready on the device (made beforehand: making them syncs)."""
    ps = [p.requires_grad_() for p in make_params(ALL_SHAPES, dtype=torch.float32, seed=5, device=DEVICE)]
    opt = getattr(hf_adamp, name)(ps, **kwargs)
    gen = torch.Generator().manual_seed(5)
    grads = [[forced_grad(p.detach(), MODES[k % len(MODES)], gen) for p in ps] for k in range(8)]
    for k in range(3):
        for p, g in zip(ps, grads[k]):
            p.grad = g
        opt.step()
    torch.cuda.synchronize()
    return opt, ps, grads[3:]


def step_with_new_lr(opt: torch.optim.Optimizer, ps: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:  # a new lr every step: float arguments must neither sync nor recompile
        for group in opt.param_groups:
            group["lr"] *= 0.9
        for p, g in zip(ps, step_grads):
            p.grad = g
        opt.step()


def compiled_kernel_variants() -> int:
    """How many kernel variants triton has compiled for hf_adamp's Triton kernels so far (skips where this
    triton keeps them where this cannot see)."""
    from triton.runtime.jit import JITFunction

    from hf_adamp.kernels import triton_step

    count = 0
    try:
        for fn in vars(triton_step).values():
            if isinstance(fn, JITFunction):
                count += sum(len(caches[0]) for caches in fn.device_caches.values())
    except (AttributeError, TypeError, IndexError, KeyError) as exc:
        pytest.skip(f"this triton keeps its compiled kernels elsewhere ({type(exc).__name__}: {exc})")
    if count == 0:
        pytest.skip("no compiled kernel found in triton's caches: this triton keeps them elsewhere")
    return count


@cuda
@needs_cuda_itself
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_steps_never_sync_with_the_host(launches, name, kwargs):
    opt, ps, grads = warmed_up(name, kwargs)
    before = total(launches)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step_with_new_lr(opt, ps, grads)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert total(launches) > before


@cuda
@needs_cuda_itself
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_no_kernel_recompiled_between_steps(launches, name, kwargs):
    opt, ps, grads = warmed_up(name, kwargs)
    variants = compiled_kernel_variants()
    step_with_new_lr(opt, ps, grads)
    torch.cuda.synchronize()
    assert compiled_kernel_variants() == variants
    assert_triton_path_taken(launches, name)


# ---------------------------------------------------------------------------------- this file's logic, on CPU
# Small cases of each kind, for test_a_few_cases_under_the_interpreter (about 30 s on two busy cores).
INTERPRETER_SUBSET = (
    "(fp32 and small and (AdamP-1 or SGDP-4)) or (half and small and bf16 and AdamP-2) or (sharded and SGDP-3)"
    " or (maximize and SGDP-5)"
)


@pytest.mark.slow
@pytest.mark.skipif(ON_CPU, reason="this is the subprocess")
def test_a_few_cases_under_the_interpreter():
    """Runs a few of the cuda tests on CPU through Triton's interpreter, so that every machine checks that the
    tests above can pass, and what they assert."""
    pytest.importorskip("triton")
    env = dict(os.environ, **INTERPRETER_ENV, **{ON_CPU_SWITCH: "1"})
    env.pop(kernels.DISABLE_ENV, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-k", INTERPRETER_SUBSET]
    cmd.append(str(Path(__file__).relative_to(ROOT)))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) == 5 and "skipped" not in done.stdout, done.stdout[-3000:]
