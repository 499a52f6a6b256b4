"""AdamP under FSDP1 (flat parameters; use_orig_params False and True) on 2 gloo ranks equals
single-process adamp.AdamP, attached by hand or by itself; it refuses tensors of an FSDP1 model it cannot find."""

from __future__ import annotations

import pytest
from _dist_helpers import run_ranks
from _fsdp1_workers import run_all
from _sharding_models import max_rel_err, reference_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORLD = 2
TOL = 1e-6

CONFIGS = {
    "flat": dict(use_orig_params=False),
    "orig": dict(use_orig_params=True),
    "flat-auto": dict(use_orig_params=False, attach=False),
    "orig-auto": dict(use_orig_params=True, attach=False),
    "orig-accelerate": dict(use_orig_params=True, attach=False, accelerate=True),
    "flat-unknown": dict(use_orig_params=False, attach=False, forget=True),
    "orig-unknown": dict(use_orig_params=True, attach=False, forget=True),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(run_all, WORLD, tmp_path_factory.mktemp("fsdp1"), CONFIGS, timeout=240)


@pytest.mark.parametrize("key", ["flat", "orig", "flat-auto", "orig-auto", "orig-accelerate"])
def test_fsdp1_equals_single_process(runs, key) -> None:
    """Attached by hand, or found by the optimizer itself at its first step (no attach() call)."""
    # flat: one group, so every parameter decays (as FSDP1 flat parameters force)
    reference = reference_run(WORLD, all_decay=key.startswith("flat"))
    for rank_runs in runs:
        res = rank_runs[key]
        assert "error" not in res, res
        errs = max_rel_err(res["params"], reference)
        assert max(errs.values()) < TOL, errs
    print(f"FSDP1 {key}: max rel err {max(errs.values()):.2e} over {len(errs)} tensors")
    decisions = runs[0][key]["decisions"]
    assert "channel" in decisions["fc1.weight"], decisions
    assert "layer" in decisions["fc2.weight"], decisions
    assert "none" in decisions["fc3.weight"], decisions


@pytest.mark.parametrize("key, kind", [("flat-unknown", "FSDP1 FlatParameter"), ("orig-unknown", "FSDP1 local slice")])
def test_unknown_fsdp1_model_raises_instead_of_acting_as_adamw(runs, key, kind) -> None:
    """An FSDP1 model built before hf_adamp was imported cannot be found: the step refuses its tensors."""
    for rank_runs in runs:
        error = rank_runs[key].get("error", "")
        assert f"step() was handed an {kind}" in error and "no sharding layout" in error, rank_runs[key]
