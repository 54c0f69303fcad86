"""benchmarks/prep_scale.py judges the README's four preparation targets on CPU seconds and fails on a miss."""

from __future__ import annotations

from tests.workflow.wf import benchmark

#: the figures of a run on the shared machine (2026-12-07, n = 5): read and preprocess miss, the rest meet
MEASURED = {"prep_plus_shards_cpu_s_per_volume": 1.148, "shard_mb_per_volume": 32.9,
            "read_vol_per_cpu_s": {"decode": 7.2, "hu_to_unit": 3.62, "indexed": 4.94}, "preprocess_1_thread_cpu_s": 0.788}


def test_each_target_is_judged_and_a_miss_is_named():
    bench = benchmark("prep_scale")
    checks = bench.verdicts(MEASURED)
    assert [ok for ok, _ in checks] == [True, True, False, False]
    assert "3.62 vol/CPU s (target >= 5): MISSES" in checks[2][1]
    assert "1.148 CPU s (target <= 1.5): meets" in checks[0][1]
    met = {**MEASURED, "read_vol_per_cpu_s": {"hu_to_unit": 5.0}, "preprocess_1_thread_cpu_s": 0.6}
    assert all(ok for ok, _ in bench.verdicts(met))  # the bounds are inclusive
    assert not bench.verdicts({**met, "shard_mb_per_volume": 50.1})[1][0]
    assert not bench.verdicts({**met, "prep_plus_shards_cpu_s_per_volume": 1.51})[0][0]
