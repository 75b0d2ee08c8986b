"""Evaluation statistics: means with intervals, baseline deltas, the gate, scores files.

    scored = [score_example(metrics, r) for r in records]            # eval_metrics
    summary = summarize("small-model", scored, BootstrapConfig())
    deltas = compare(scored, baseline_scored, BootstrapConfig())     # baseline: a previous scores file
    verdict = apply_gate(GateConfig(min={"exact_match": 0.8}), summary, deltas)

Intervals of a mean: for a 0/1 metric (every value 0 or 1: exact match, contains, JSON valid, ...)
the Wilson score interval, which stays honest at small n (20 of 20 correct gives [0.839, 1.0], not
the bootstrap's [1.0, 1.0]: resampling 20 ones only ever yields ones); for any other metric a
percentile bootstrap interval, deterministic for a given seed. Deltas against a baseline use the
bootstrap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import Field

from prefect_rayllm.rayllm_stages.config.base import StrictModel
from prefect_rayllm.rayllm_stages.evaluation.metrics import ScoredExample

# Bootstrap draws held in memory at once (samples x n indices); larger runs resample in chunks.
_MAX_DRAWS = 2_000_000
# Means of floats land a hair off the exact value (0.7 -> 0.6999999999999998); thresholds forgive that.
_EPSILON = 1e-9


class BootstrapConfig(StrictModel):
    samples: int = Field(1000, ge=100, description="Bootstrap resamples")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Interval coverage (Wilson and bootstrap intervals)")
    seed: int = 0


class MetricSummary(StrictModel):
    """One metric's mean over the examples that have a value; None values count in n_missing."""

    name: str
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    n_missing: int
    interval: Literal["wilson", "bootstrap"] | None = Field(
        None, description="how ci_low/ci_high were found: Wilson score (0/1 metrics) or percentile bootstrap"
    )


class TargetSummary(StrictModel):
    """One target's results: overall metrics and the same metrics per tag (slices[tag][metric])."""

    target: str
    examples: int
    failed: int
    judge_errors: int
    confidence: float
    metrics: dict[str, MetricSummary]
    slices: dict[str, dict[str, MetricSummary]]

    @property
    def failure_rate(self) -> float | None:
        return self.failed / self.examples if self.examples else None


class MetricDelta(StrictModel):
    """current - baseline for one metric, with a bootstrap interval of the difference.

    Paired: means over the examples scored in both runs (n_current == n_baseline == pairs).
    Unpaired: each run's own mean over its scored examples.
    """

    metric: str
    current: float | None
    baseline: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    paired: bool
    n_current: int
    n_baseline: int


class GateConfig(StrictModel):
    """Thresholds a target must meet. Metric names are checked with `check_gate_metrics`."""

    min: dict[str, float] = Field(default_factory=dict, description="Lowest allowed mean (quality metrics)")
    max: dict[str, float] = Field(default_factory=dict, description="Highest allowed mean (e.g. latency)")
    max_regression: dict[str, float] = Field(
        default_factory=dict,
        description="Largest allowed drop of the mean vs the baseline; passes when there is no baseline",
    )
    max_failure_rate: float | None = Field(None, ge=0.0, le=1.0, description="Failed target calls / examples")
    fail_flow: bool = Field(True, description="Fail the flow run when the gate fails")
    use_ci: bool = Field(False, description="Check min thresholds against the interval's low end")


class GateCheck(StrictModel):
    name: str
    metric: str | None  # None for max_failure_rate
    kind: Literal["min", "max", "max_regression", "max_failure_rate"]
    threshold: float
    value: float | None
    passed: bool
    detail: str


class Verdict(StrictModel):
    target: str
    passed: bool
    checks: list[GateCheck]
    has_baseline: bool


def _bootstrap_means(values: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `samples` resamples (with replacement) of `values`."""
    n = values.size
    means = np.empty(samples)
    chunk = max(1, _MAX_DRAWS // n)
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def _interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (`successes` of `n`), for 0/1 outcomes.

    Unlike the bootstrap (or the normal approximation) it does not collapse to a point when every
    outcome is the same: 20 of 20 gives [0.839, 1.0] at 95%, 0 of 10 gives [0.0, 0.278].

    Raises:
        ValueError: n is not positive, or successes is outside [0, n].
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    z = float(NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0))
    p, z2 = successes / n, z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denominator
    # At p = 0 or 1 the bound is exactly 0 or 1 (the formula lands a rounding error off it).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def is_binary(values: np.ndarray) -> bool:
    """Every value is 0 or 1: a proportion, which gets the Wilson interval."""
    return bool(values.size) and bool(np.all((values == 0.0) | (values == 1.0)))


def summarize_metric(name: str, values: Sequence[float | None], bootstrap: BootstrapConfig) -> MetricSummary:
    """Mean and interval of the non-None values: Wilson for 0/1 values, else percentile bootstrap."""
    present = np.array([v for v in values if v is not None], dtype=float)
    n, missing = int(present.size), len(values) - int(present.size)
    if n == 0:
        return MetricSummary(name=name, mean=None, ci_low=None, ci_high=None, n=0, n_missing=missing)
    mean = float(present.mean())
    if is_binary(present):
        low, high = wilson_interval(int(present.sum()), n, bootstrap.confidence)
        return MetricSummary(name=name, mean=mean, ci_low=low, ci_high=high, n=n, n_missing=missing, interval="wilson")
    rng = np.random.default_rng(bootstrap.seed)
    low, high = _interval(_bootstrap_means(present, bootstrap.samples, rng), bootstrap.confidence)
    # Percentiles of a skewed bootstrap distribution can sit a rounding error beside the mean.
    return MetricSummary(
        name=name, mean=mean, ci_low=min(low, mean), ci_high=max(high, mean), n=n, n_missing=missing, interval="bootstrap"
    )


def metric_names(scored: Iterable[ScoredExample]) -> list[str]:
    """Every metric name in the scores, in first-seen order."""
    names: dict[str, None] = {}
    for example in scored:
        names.update(dict.fromkeys(example.scores))
    return list(names)


def _summarize_metrics(scored: Sequence[ScoredExample], bootstrap: BootstrapConfig) -> dict[str, MetricSummary]:
    return {
        name: summarize_metric(name, [example.scores.get(name) for example in scored], bootstrap) for name in metric_names(scored)
    }


def summarize(target: str, scored: Sequence[ScoredExample], bootstrap: BootstrapConfig) -> TargetSummary:
    """Per-metric means and intervals, overall and per tag (an example counts in each of its tags)."""
    by_tag: dict[str, list[ScoredExample]] = {}
    for example in scored:
        for tag in dict.fromkeys(example.tags):
            by_tag.setdefault(tag, []).append(example)
    return TargetSummary(
        target=target,
        examples=len(scored),
        failed=sum(1 for example in scored if example.error),
        judge_errors=sum(1 for example in scored if example.judge_error),
        confidence=bootstrap.confidence,
        metrics=_summarize_metrics(scored, bootstrap),
        slices={tag: _summarize_metrics(by_tag[tag], bootstrap) for tag in sorted(by_tag)},
    )


def _by_id(scored: Sequence[ScoredExample], which: str) -> dict[str, ScoredExample]:
    examples: dict[str, ScoredExample] = {}
    for example in scored:
        if example.id in examples:
            raise ValueError(f"{which} scores hold example id {example.id!r} twice; ids must be unique")
        examples[example.id] = example
    return examples


def _paired_delta(name: str, pairs: list[tuple[float, float]], bootstrap: BootstrapConfig) -> MetricDelta:
    n = len(pairs)
    if n == 0:
        return MetricDelta(
            metric=name,
            current=None,
            baseline=None,
            delta=None,
            ci_low=None,
            ci_high=None,
            paired=True,
            n_current=0,
            n_baseline=0,
        )
    table = np.array(pairs, dtype=float)
    current, baseline = table[:, 0], table[:, 1]
    differences = current - baseline
    delta = float(differences.mean())
    rng = np.random.default_rng(bootstrap.seed)
    low, high = _interval(_bootstrap_means(differences, bootstrap.samples, rng), bootstrap.confidence)
    return MetricDelta(
        metric=name,
        current=float(current.mean()),
        baseline=float(baseline.mean()),
        delta=delta,
        ci_low=min(low, delta),
        ci_high=max(high, delta),
        paired=True,
        n_current=n,
        n_baseline=n,
    )


def _unpaired_delta(name: str, current: list[float], baseline: list[float], bootstrap: BootstrapConfig) -> MetricDelta:
    if not current or not baseline:
        mean_current = float(np.mean(current)) if current else None
        mean_baseline = float(np.mean(baseline)) if baseline else None
        return MetricDelta(
            metric=name,
            current=mean_current,
            baseline=mean_baseline,
            delta=None,
            ci_low=None,
            ci_high=None,
            paired=False,
            n_current=len(current),
            n_baseline=len(baseline),
        )
    ours, theirs = np.array(current, dtype=float), np.array(baseline, dtype=float)
    delta = float(ours.mean() - theirs.mean())
    rng = np.random.default_rng(bootstrap.seed)
    differences = _bootstrap_means(ours, bootstrap.samples, rng) - _bootstrap_means(theirs, bootstrap.samples, rng)
    low, high = _interval(differences, bootstrap.confidence)
    return MetricDelta(
        metric=name,
        current=float(ours.mean()),
        baseline=float(theirs.mean()),
        delta=delta,
        ci_low=min(low, delta),
        ci_high=max(high, delta),
        paired=False,
        n_current=len(current),
        n_baseline=len(baseline),
    )


def compare(
    current: Sequence[ScoredExample], baseline: Sequence[ScoredExample], bootstrap: BootstrapConfig
) -> dict[str, MetricDelta]:
    """current - baseline for each metric both runs scored.

    Paired bootstrap over the ids present in both when at least half of the current ids are in the
    baseline (the usual case: the same dataset); otherwise an unpaired bootstrap of the difference of
    means. Examples with None for a metric drop out of that metric only.

    Raises:
        ValueError: an id occurs twice in one run.
    """
    ours, theirs = _by_id(current, "current"), _by_id(baseline, "baseline")
    common = [example_id for example_id in ours if example_id in theirs]
    paired = len(common) * 2 >= len(ours)
    baseline_names = set(metric_names(baseline))
    deltas: dict[str, MetricDelta] = {}
    for name in metric_names(current):
        if name not in baseline_names:
            continue
        if paired:
            pairs = []
            for example_id in common:
                value, baseline_value = ours[example_id].scores.get(name), theirs[example_id].scores.get(name)
                if value is not None and baseline_value is not None:
                    pairs.append((value, baseline_value))
            deltas[name] = _paired_delta(name, pairs, bootstrap)
        else:
            values = [v for e in current if (v := e.scores.get(name)) is not None]
            baseline_values = [v for e in baseline if (v := e.scores.get(name)) is not None]
            deltas[name] = _unpaired_delta(name, values, baseline_values, bootstrap)
    return deltas


def check_gate_metrics(gate: GateConfig, metric_names: Iterable[str]) -> None:
    """Raise ValueError naming every gate threshold whose metric is not among `metric_names`."""
    known = list(metric_names)
    unknown = [
        f"gate.{kind}.{name}"
        for kind, thresholds in (("min", gate.min), ("max", gate.max), ("max_regression", gate.max_regression))
        for name in thresholds
        if name not in known
    ]
    if unknown:
        raise ValueError(f"unknown metric in {', '.join(unknown)}; metrics: {', '.join(known) or '(none)'}")


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _min_check(gate: GateConfig, summary: MetricSummary, threshold: float) -> GateCheck:
    what = "CI low" if gate.use_ci else "mean"
    value = summary.ci_low if gate.use_ci else summary.mean
    if value is None:
        passed, detail = False, f"no scored examples for {summary.name}, so no {what} to check"
    else:
        passed = value >= threshold - _EPSILON
        detail = f"{what} {_fmt(value)} {'>=' if passed else '<'} {_fmt(threshold)}"
    return GateCheck(
        name=f"min:{summary.name}",
        metric=summary.name,
        kind="min",
        threshold=threshold,
        value=value,
        passed=passed,
        detail=detail,
    )


def _max_check(summary: MetricSummary, threshold: float) -> GateCheck:
    value = summary.mean
    if value is None:
        passed, detail = False, f"no scored examples for {summary.name}, so no mean to check"
    else:
        passed = value <= threshold + _EPSILON
        detail = f"mean {_fmt(value)} {'<=' if passed else '>'} {_fmt(threshold)}"
    return GateCheck(
        name=f"max:{summary.name}",
        metric=summary.name,
        kind="max",
        threshold=threshold,
        value=value,
        passed=passed,
        detail=detail,
    )


def _regression_check(metric: str, threshold: float, deltas: Mapping[str, MetricDelta] | None) -> GateCheck:
    delta = deltas.get(metric) if deltas is not None else None
    value = delta.delta if delta is not None else None
    if deltas is None:
        passed, detail = True, "no baseline"
    elif value is None:
        passed, detail = True, "no baseline values for this metric"
    else:
        passed = value >= -threshold - _EPSILON
        detail = f"change {value:+.4g} vs baseline, allowed drop {_fmt(threshold)}"
    return GateCheck(
        name=f"max_regression:{metric}",
        metric=metric,
        kind="max_regression",
        threshold=threshold,
        value=value,
        passed=passed,
        detail=detail,
    )


def _failure_check(summary: TargetSummary, threshold: float) -> GateCheck:
    rate = summary.failure_rate
    if rate is None:
        passed, detail = False, "no examples"
    else:
        passed = rate <= threshold + _EPSILON
        detail = f"{summary.failed}/{summary.examples} target calls failed ({rate:.1%}), allowed {threshold:.1%}"
    return GateCheck(
        name="max_failure_rate",
        metric=None,
        kind="max_failure_rate",
        threshold=threshold,
        value=rate,
        passed=passed,
        detail=detail,
    )


def _summary_or_empty(summary: TargetSummary, metric: str) -> MetricSummary:
    return summary.metrics.get(metric) or MetricSummary(name=metric, mean=None, ci_low=None, ci_high=None, n=0, n_missing=0)


def apply_gate(gate: GateConfig, summary: TargetSummary, deltas: Mapping[str, MetricDelta] | None) -> Verdict:
    """Check every threshold; the target passes when all checks pass (no thresholds: passes).

    `deltas` is `compare(...)` against the baseline, or None without one: max_regression checks then
    pass with detail "no baseline".
    """
    checks = [_min_check(gate, _summary_or_empty(summary, m), t) for m, t in gate.min.items()]
    checks += [_max_check(_summary_or_empty(summary, m), t) for m, t in gate.max.items()]
    checks += [_regression_check(m, t, deltas) for m, t in gate.max_regression.items()]
    if gate.max_failure_rate is not None:
        checks.append(_failure_check(summary, gate.max_failure_rate))
    return Verdict(target=summary.target, passed=all(c.passed for c in checks), checks=checks, has_baseline=deltas is not None)


def scores_to_jsonl(target: str, scored: Iterable[ScoredExample]) -> str:
    """One JSON object per example: {"target", "id", "tags", "error", "judge_error", "scores"}."""
    return "".join(json.dumps({"target": target, **example.model_dump()}, allow_nan=False) + "\n" for example in scored)


def scores_from_jsonl(text: str) -> dict[str, list[ScoredExample]]:
    """Per-example scores by target, from one or more `scores_to_jsonl` outputs joined together.

    Raises:
        ValueError: a line is not JSON or not a scores line; the message gives its line number.
    """
    by_target: dict[str, list[ScoredExample]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            target = row.pop("target")
            if not isinstance(target, str):
                raise TypeError("target must be a string")
            by_target.setdefault(target, []).append(ScoredExample.model_validate(row))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"scores line {number}: {error}") from error
    return by_target
