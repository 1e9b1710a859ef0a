"""Latency subset (seeded, 10%) and statistics (numpy percentiles, GPU latency)."""

import numpy as np
import pytest

from egm.eval.latency import latency_stats, latency_subset, timed_call


def test_subset_is_seeded_ten_percent_and_order_free():
    ids = [f"s{i}" for i in range(1234)]
    a = latency_subset(ids, 0.1, seed=0, key="refcoco_unc_val")
    assert len(a) == 123 and len(set(a)) == 123 and set(a) <= set(ids)
    assert latency_subset(list(reversed(ids)), 0.1, seed=0, key="refcoco_unc_val") == a
    assert latency_subset(ids, 0.1, seed=1, key="refcoco_unc_val") != a
    assert latency_subset(ids, 0.1, seed=0, key="refcoco_unc_testA") != a
    assert len(latency_subset(ids + ["extra"], 0.1)) == 124  # 123.5 rounds half up
    assert len(latency_subset(ids[:3], 0.1)) == 1  # never empty
    assert latency_subset([], 0.1) == []
    with pytest.raises(ValueError):
        latency_subset(ids, 0.0)


def test_stats_equal_numpy_percentiles():
    rng = np.random.default_rng(3)
    lat = rng.uniform(100, 900, size=37)
    toks = rng.integers(10, 200, size=37)
    s = latency_stats(lat, list(toks), num_gpus=4)
    assert s.n == 37
    assert s.mean_ms == pytest.approx(lat.mean())
    assert s.p50_ms == pytest.approx(np.percentile(lat, 50))
    assert s.p90_ms == pytest.approx(np.percentile(lat, 90))
    assert s.mean_tokens == pytest.approx(toks.mean())
    assert (s.gpu_mean_ms, s.gpu_p50_ms, s.gpu_p90_ms) == pytest.approx((4 * s.mean_ms, 4 * s.p50_ms, 4 * s.p90_ms))
    assert latency_stats([]) is None


def test_timed_call_uses_injected_clock():
    ticks = iter([10.0, 10.25])
    out, ms = timed_call(lambda: "x", clock=lambda: next(ticks))
    assert out == "x" and ms == pytest.approx(250.0)
