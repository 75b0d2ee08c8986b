"""Intervals that do not overstate: Wilson score for 0/1 metrics, the bootstrap for the others."""

import numpy as np
import pytest

from prefect_rayllm.rayllm_stages.evaluation.metrics import ScoredExample
from prefect_rayllm.rayllm_stages.evaluation.stats import (
    BootstrapConfig,
    GateConfig,
    apply_gate,
    summarize,
    summarize_metric,
    wilson_interval,
)

BOOT = BootstrapConfig(samples=500, seed=7)


def scored(values, metric="acc"):
    return [ScoredExample(id=f"e{i}", scores={metric: None if v is None else float(v)}) for i, v in enumerate(values)]


# Known values of the Wilson (1927) score interval (z = 1.959964 for 95%); the same digits come from
# inverting the score test |p_hat - p| <= z * sqrt(p (1 - p) / n) numerically.
@pytest.mark.parametrize(
    ("successes", "n", "confidence", "expected"),
    [
        (20, 20, 0.95, (0.8389, 1.0)),
        (0, 10, 0.95, (0.0, 0.2775)),
        (5, 10, 0.95, (0.2366, 0.7634)),
        (1, 1, 0.95, (0.2065, 1.0)),
        (81, 263, 0.95, (0.2553, 0.3662)),
        (20, 20, 0.90, (0.8808, 1.0)),
    ],
)
def test_wilson_interval_known_values(successes, n, confidence, expected):
    low, high = wilson_interval(successes, n, confidence)
    assert (low, high) == pytest.approx(expected, abs=1e-4)


def test_wilson_interval_refuses_impossible_counts():
    for successes, n in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match="successes"):
            wilson_interval(successes, n)


def test_all_correct_at_small_n_is_not_a_point_interval():
    summary = summarize_metric("exact_match", [1.0] * 20, BOOT)
    assert summary.mean == 1.0 and summary.interval == "wilson"
    assert (summary.ci_low, summary.ci_high) == pytest.approx((0.8389, 1.0), abs=1e-4)
    none_right = summarize_metric("exact_match", [0.0] * 10 + [None], BOOT)
    assert (none_right.ci_low, none_right.ci_high) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert none_right.n == 10 and none_right.n_missing == 1


def test_wilson_narrows_with_n_and_contains_the_mean():
    rng = np.random.default_rng(5)
    widths = []
    for n in (10, 100, 1000):
        m = summarize("t", scored(rng.random(n) < 0.7), BOOT).metrics["acc"]
        assert m.interval == "wilson" and m.ci_low < m.mean < m.ci_high
        widths.append(m.ci_high - m.ci_low)
    assert widths[0] > widths[1] > widths[2]


def test_continuous_metrics_keep_the_bootstrap():
    values = [0.25, 0.5, 0.75, 1.0, 0.0, 0.5]
    m = summarize_metric("judge", values, BOOT)
    assert m.interval == "bootstrap" and m.ci_low <= m.mean <= m.ci_high
    assert m == summarize_metric("judge", values, BOOT)  # deterministic for a seed
    assert summarize_metric("judge", [], BOOT).interval is None


def test_use_ci_gate_fails_on_twenty_of_twenty_and_passes_on_enough_evidence():
    """20 of 20 correct is not evidence of >= 90%: the Wilson low end is 0.839."""
    small = summarize("t", scored([1] * 20), BOOT)
    verdict = apply_gate(GateConfig(min={"acc": 0.9}, use_ci=True), small, None)
    assert not verdict.passed
    (check,) = verdict.checks
    assert check.value == pytest.approx(0.8389, abs=1e-4) and check.detail == "CI low 0.8389 < 0.9"
    assert apply_gate(GateConfig(min={"acc": 0.9}), small, None).passed  # on the mean it passes
    large = summarize("t", scored([1] * 200), BOOT)
    assert apply_gate(GateConfig(min={"acc": 0.9}, use_ci=True), large, None).passed  # low end 0.981
