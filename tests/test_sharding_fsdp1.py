"""AdamP under FSDP1 (flat parameters; use_orig_params False and True) on 2 gloo ranks equals
single-process adamp.AdamP once attached."""

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
    "flat-unattached": dict(use_orig_params=False, attach=False),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(run_all, WORLD, tmp_path_factory.mktemp("fsdp1"), CONFIGS, timeout=240)


@pytest.mark.parametrize("key", ["flat", "orig"])
def test_fsdp1_equals_single_process(runs, key) -> None:
    # flat: one group, so every parameter decays (as FSDP1 flat parameters force)
    reference = reference_run(WORLD, all_decay=(key == "flat"))
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


def test_flat_parameter_without_layout_raises(runs) -> None:
    for rank_runs in runs:
        assert "FlatParameter" in rank_runs["flat-unattached"].get("error", ""), rank_runs["flat-unattached"]
