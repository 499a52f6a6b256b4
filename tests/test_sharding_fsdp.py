"""AdamP under FSDP2 (fully_shard, DTensor Shard(0), uneven and empty shards) on 2 gloo ranks equals
single-process adamp.AdamP, with attach() or attached automatically; the reference crashes on DTensors."""

from __future__ import annotations

import pytest
from _dist_helpers import run_ranks
from _fsdp_workers import run_all
from _sharding_models import max_rel_err, reference_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORLD = 2
TOL = 1e-6  # fp32

CONFIGS = {
    "ours": dict(opt="ours"),
    "reference": dict(opt="reference"),
    "ours-auto": dict(opt="ours", attach=False),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_ranks(run_all, WORLD, tmp_path_factory.mktemp("fsdp"), CONFIGS, timeout=240)


@pytest.mark.parametrize("key", ["ours", "ours-auto"])
def test_fsdp2_equals_single_process(runs, key) -> None:
    reference = reference_run(WORLD)
    for rank_runs in runs:
        res = rank_runs[key]
        assert "error" not in res, res
        errs = max_rel_err(res["params"], reference)
        assert max(errs.values()) < TOL, errs
    print(f"FSDP2: max rel err {max(errs.values()):.2e} over {len(errs)} tensors")
    # uneven shards (19 rows: 10 + 9) and an empty one (1 row: 1 + 0)
    assert [r[key]["local_rows"]["fc1.weight"] for r in runs] == [10, 9]
    assert [r[key]["local_rows"]["gate.weight"] for r in runs] == [1, 0]
    for rank_runs in runs:  # every rank takes the same decisions, including the one holding no gate row
        decisions = rank_runs[key]["decisions"]
        assert decisions == runs[0][key]["decisions"]
        assert "channel" in decisions["fc1.weight"], decisions
        assert "layer" in decisions["fc2.weight"], decisions
        assert "none" in decisions["fc3.weight"], decisions
        assert "fc1.bias" not in decisions


def test_reference_crashes_on_dtensors(runs) -> None:
    assert "error" in runs[0]["reference"], "adamp.AdamP unexpectedly ran on FSDP2 DTensors"
