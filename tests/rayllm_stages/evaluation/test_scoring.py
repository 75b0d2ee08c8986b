"""Evaluation scoring core: metrics, bootstrap statistics, baseline comparison, gate, report."""

import json

import numpy as np
import pytest
from pydantic import ValidationError

from prefect_rayllm.rayllm_stages.evaluation.metrics import (
    ScoredExample,
    missing_references,
    normalize_text,
    parse_metrics,
    quality_metric_names,
    score_example,
)
from prefect_rayllm.rayllm_stages.evaluation.report import render_markdown, render_plots, slugify
from prefect_rayllm.rayllm_stages.evaluation.stats import (
    BootstrapConfig,
    GateConfig,
    apply_gate,
    check_gate_metrics,
    compare,
    scores_from_jsonl,
    scores_to_jsonl,
    summarize,
)

BOOT = BootstrapConfig(samples=500, seed=7)


def record(id="e1", **fields):
    base = {
        "id": id,
        "input": "q",
        "reference": "Paris",
        "tags": [],
        "prediction": "Paris",
        "error": "",
        "latency_s": 0.5,
        "num_input_tokens": 10,
        "num_generated_tokens": 3,
        "judge": None,
        "judge_error": "",
    }
    return base | fields


def score(spec, **fields):
    metrics = parse_metrics([spec])
    return score_example(metrics, record(**fields)).scores[metrics[0].name]


def scored(values, metric="acc", prefix="e", tags=None):
    return [
        ScoredExample(id=f"{prefix}{i}", tags=tags or [], scores={metric: None if v is None else float(v)})
        for i, v in enumerate(values)
    ]


# Metrics


def test_normalisation_strips_case_quotes_end_punctuation_and_spaces():
    assert normalize_text(' "The   Eiffel\tTower." ') == "the eiffel tower"
    assert normalize_text("\u201cParis!\u201d") == "paris"
    assert normalize_text("U.S.A.") == "u.s.a"  # inner punctuation stays


@pytest.mark.parametrize(
    "spec, prediction, expected",
    [
        ({"type": "exact_match"}, "  paris. ", 1.0),
        ({"type": "exact_match"}, "'PARIS'", 1.0),
        ({"type": "exact_match"}, "Paris, France", 0.0),
        ({"type": "exact_match", "normalize": False}, "paris", 0.0),
        ({"type": "exact_match", "normalize": False}, "Paris", 1.0),
        ({"type": "contains"}, "It is PARIS, of course.", 1.0),
        ({"type": "contains"}, "Lyon", 0.0),
        ({"type": "contains", "case_sensitive": True}, "it is paris", 0.0),
        ({"type": "contains", "case_sensitive": True}, "it is Paris.", 1.0),
        ({"type": "regex", "pattern": r"^\s*Par"}, "  Paris", 1.0),
        ({"type": "regex", "pattern": r"^Par"}, "In Paris", 0.0),
        ({"type": "regex", "use_reference": True}, "Paris it is", 1.0),
    ],
)
def test_text_metrics(spec, prediction, expected):
    assert score(spec, prediction=prediction) == expected


@pytest.mark.parametrize(
    "spec, prediction, reference, expected",
    [
        ({"type": "numeric"}, "The answer is 42.", "42", 1.0),
        ({"type": "numeric"}, "42.0", "42", 1.0),
        ({"type": "numeric"}, "about 1,234 km", "1234", 1.0),
        ({"type": "numeric"}, "It is -3", "3", 0.0),
        ({"type": "numeric"}, "no idea", "3", 0.0),
        ({"type": "numeric"}, "43", "42", 0.0),
        ({"type": "numeric", "tolerance": 0.1}, "1.1", "1.0", 1.0),  # float rounding must not reject
        ({"type": "numeric", "tolerance": 0.1}, "1.2", "1.0", 0.0),
        ({"type": "numeric", "tolerance": 0.01, "relative": True}, "1009", "1000", 1.0),
        ({"type": "numeric", "tolerance": 0.01, "relative": True}, "1011", "1000", 0.0),
    ],
)
def test_numeric_metric(spec, prediction, reference, expected):
    assert score(spec, prediction=prediction, reference=reference) == expected


SCHEMA = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ('{"score": 3}', 1.0),
        ('```json\n{"score": 3}\n```', 1.0),
        ('{"score": "3"}', 0.0),
        ("{'score': 3}", 0.0),
        ('{"score": 3', 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_json_schema_metric(prediction, expected):
    assert score({"type": "json_schema", "schema": SCHEMA}, prediction=prediction) == expected


def test_measurements_are_raw_values():
    specs = [
        {"type": "length", "name": "chars"},
        {"type": "length", "unit": "words", "name": "words"},
        {"type": "length", "unit": "tokens", "name": "gen_tokens"},
        {"type": "latency"},
        {"type": "tokens"},
    ]
    metrics = parse_metrics(specs)
    assert quality_metric_names(metrics) == []
    scores = score_example(metrics, record(prediction="two words", latency_s=1.25)).scores
    assert scores == {"chars": 9.0, "words": 2.0, "gen_tokens": 3.0, "latency": 1.25, "tokens": 13.0}


@pytest.mark.parametrize(
    "judge, judge_error, expected, error_says",
    [
        ({"score": 5}, "", 1.0, ""),
        ({"score": 1}, "", 0.0, ""),
        ({"score": 4}, "", 0.75, ""),
        ({"score": 7}, "", None, "outside"),
        ({"score": 0}, "", None, "outside"),
        ({"score": "good"}, "", None, "no numeric"),
        ({"score": True}, "", None, "no numeric"),
        ({"verdict": 3}, "", None, "no numeric"),
        (None, "", None, "no judge reply"),
        ({"score": 5}, "judge timed out", None, "judge timed out"),
    ],
)
def test_judge_metric(judge, judge_error, expected, error_says):
    example = score_example(parse_metrics([{"type": "judge"}]), record(judge=judge, judge_error=judge_error))
    assert example.scores["judge"] == expected
    assert (error_says in example.judge_error) if error_says else example.judge_error == ""


def test_failed_target_scores_zero_on_quality_and_none_on_measurements():
    metrics = parse_metrics([{"type": "exact_match"}, {"type": "judge"}, {"type": "latency"}, {"type": "length"}])
    example = score_example(metrics, record(prediction=None, error="HTTP 500", latency_s=None))
    assert example.scores == {"exact_match": 0.0, "judge": 0.0, "latency": None, "length": None}
    assert example.error == "HTTP 500" and example.judge_error == ""


def test_missing_reference_is_an_error_naming_example_and_metric():
    metrics = parse_metrics([{"type": "latency"}, {"type": "numeric", "name": "num"}])
    records = [record("ok", reference="4"), record("none", reference=None), record("words", reference="four")]
    assert missing_references(metrics, records) == ["none", "words"]
    with pytest.raises(ValueError, match="example 'none', metric 'num'"):
        score_example(metrics, records[1])
    assert missing_references(parse_metrics([{"type": "latency"}]), records) == []


@pytest.mark.parametrize(
    "specs, message",
    [
        ([{"type": "regex", "pattern": "("}], "not a valid regular expression"),
        ([{"type": "regex"}], "either pattern or use_reference"),
        ([{"type": "json_schema", "schema": {"type": "nope"}}], "not a valid JSON schema"),
        ([{"type": "judge", "min_score": 5, "max_score": 1}], "max_score"),
        ([{"type": "exact_match", "normalise": True}], "normalise"),
        ([{"type": "bleu"}], "bleu"),
        ([{"type": "exact_match"}, {"type": "exact_match", "normalize": False}], "used twice"),
    ],
)
def test_bad_metric_configs_are_rejected(specs, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        parse_metrics(specs)


def test_metric_name_defaults_to_type():
    assert [m.name for m in parse_metrics([{"type": "contains"}, {"type": "tokens", "name": "t"}])] == ["contains", "t"]


# Statistics


def test_failed_examples_stay_in_the_denominator_and_judge_errors_do_not():
    metrics = parse_metrics([{"type": "exact_match"}, {"type": "judge"}])
    records = [
        record("a", judge={"score": 5}),
        record("b", judge={"score": 5}),
        record("c", prediction=None, error="timeout"),
        record("d", judge=None, judge_error="bad json"),
    ]
    summary = summarize("t", [score_example(metrics, r) for r in records], BOOT)
    assert summary.failed == 1 and summary.judge_errors == 1 and summary.examples == 4
    assert summary.metrics["exact_match"].mean == pytest.approx(3 / 4)
    judge = summary.metrics["judge"]
    assert judge.mean == pytest.approx(2 / 3) and judge.n == 3 and judge.n_missing == 1


def test_bootstrap_interval_contains_mean_narrows_and_is_deterministic():
    rng = np.random.default_rng(1)
    small = summarize("t", scored(rng.random(40) < 0.7), BOOT).metrics["acc"]
    large = summarize("t", scored(rng.random(4000) < 0.7), BOOT).metrics["acc"]
    for m in (small, large):
        assert m.ci_low < m.mean < m.ci_high
    assert (large.ci_high - large.ci_low) < (small.ci_high - small.ci_low) / 4
    values = rng.random(100)
    first, second = (summarize("t", scored(values), BOOT).metrics["acc"] for _ in range(2))
    assert first == second
    other = summarize("t", scored(values), BootstrapConfig(samples=500, seed=8)).metrics["acc"]
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)


def test_empty_metric_and_slices():
    examples = scored([None, None])
    examples[0].tags = ["math", "hard"]
    examples[1].tags = ["math"]
    summary = summarize("t", examples + scored([1, 0], prefix="x", tags=["math"]), BOOT)
    assert set(summary.slices) == {"hard", "math"}
    assert summary.slices["hard"]["acc"].mean is None and summary.slices["hard"]["acc"].ci_low is None
    assert summary.slices["math"]["acc"].n == 2 and summary.slices["math"]["acc"].n_missing == 2
    assert summarize("t", [], BOOT).metrics == {}


def test_bootstrap_config_bounds():
    with pytest.raises(ValidationError):
        BootstrapConfig(samples=10)


def test_paired_compare_detects_improvement_and_not_an_unchanged_model():
    rng = np.random.default_rng(3)
    truth = rng.random(300)
    baseline = scored(truth < 0.6)
    better = scored(truth < 0.7)  # same examples, 10 points more solved
    delta = compare(better, baseline, BOOT)["acc"]
    assert delta.paired and delta.delta == pytest.approx(0.1, abs=0.03)
    assert 0 < delta.ci_low < delta.delta < delta.ci_high

    noisy_rerun = scored(rng.random(300) < 0.6)
    same = compare(noisy_rerun, baseline, BOOT)["acc"]
    assert same.ci_low < 0 < same.ci_high


def test_compare_is_unpaired_when_ids_differ_and_skips_unshared_metrics():
    current = scored([1] * 50 + [0] * 50, prefix="new")
    baseline = scored([1] * 30 + [0] * 70, prefix="old")
    baseline[0].scores["extra"] = 1.0
    deltas = compare(current, baseline, BOOT)
    assert list(deltas) == ["acc"]
    delta = deltas["acc"]
    assert not delta.paired and delta.delta == pytest.approx(0.2)
    assert delta.ci_low > 0 and (delta.n_current, delta.n_baseline) == (100, 100)
    half = compare(current[:50] + scored([0] * 50, prefix="other"), current[:50] + baseline[:50], BOOT)["acc"]
    assert half.paired and half.n_current == 50 and half.delta == 0.0
    with pytest.raises(ValueError, match="twice"):
        compare(current + current[:1], baseline, BOOT)


# Gate


def summary_of(values, target="t"):
    return summarize(target, scored(values), BOOT)


def test_gate_passes_and_fails_on_min_max_and_failure_rate():
    summary = summary_of([1, 1, 1, 0])
    assert apply_gate(GateConfig(min={"acc": 0.75}), summary, None).passed
    verdict = apply_gate(GateConfig(min={"acc": 0.8}, max={"acc": 0.5}), summary, None)
    assert not verdict.passed
    assert [(c.kind, c.passed) for c in verdict.checks] == [("min", False), ("max", False)]
    assert not apply_gate(GateConfig(min={"acc": 0.7}, use_ci=True), summary, None).passed

    failing = [ScoredExample(id="f", error="boom", scores={"acc": 0.0})] + scored([1, 1, 1])
    summary = summarize("t", failing, BOOT)
    check = apply_gate(GateConfig(max_failure_rate=0.2), summary, None).checks[0]
    assert not check.passed and check.value == 0.25 and check.metric is None
    assert apply_gate(GateConfig(max_failure_rate=0.25), summary, None).passed


def test_gate_min_on_metric_without_values_fails_with_reason():
    check = apply_gate(GateConfig(min={"acc": 0.1}), summary_of([None, None]), None).checks[0]
    assert not check.passed and check.value is None and "no scored examples" in check.detail


def test_gate_max_regression_with_and_without_baseline():
    current = scored([1] * 7 + [0] * 3)
    baseline = scored([1] * 8 + [0] * 2)
    deltas = compare(current, baseline, BOOT)
    summary = summarize("t", current, BOOT)
    # a drop of 0.1 (0.7 - 0.8 is -0.10000000000000009 in floats) is allowed by 0.1, not by 0.05
    assert apply_gate(GateConfig(max_regression={"acc": 0.1}), summary, deltas).passed
    verdict = apply_gate(GateConfig(max_regression={"acc": 0.05}), summary, deltas)
    assert not verdict.passed and verdict.has_baseline
    assert verdict.checks[0].value == pytest.approx(-0.1)
    no_baseline = apply_gate(GateConfig(max_regression={"acc": 0.0}), summary, None)
    assert no_baseline.passed and not no_baseline.has_baseline
    assert no_baseline.checks[0].detail == "no baseline"


def test_gate_metric_names_are_checked():
    gate = GateConfig(min={"acc": 0.5}, max={"latency": 2.0}, max_regression={"acc": 0.1})
    check_gate_metrics(gate, ["acc", "latency"])
    with pytest.raises(ValueError, match="gate.max.latency"):
        check_gate_metrics(gate, ["acc"])
    with pytest.raises(ValidationError, match="maximum"):
        GateConfig(maximum={"acc": 1})


# Scores files and report


def test_scores_jsonl_round_trip():
    metrics = parse_metrics([{"type": "exact_match"}, {"type": "judge"}, {"type": "latency"}])
    a = [score_example(metrics, record("1", tags=["x"], judge={"score": 3})), score_example(metrics, record("2", error="boom"))]
    b = [score_example(metrics, record("1", judge_error="bad"))]
    text = scores_to_jsonl("model/a", a) + "\n" + scores_to_jsonl("b", b)
    assert json.loads(text.splitlines()[0])["target"] == "model/a"
    assert scores_from_jsonl(text) == {"model/a": a, "b": b}
    with pytest.raises(ValueError, match="line 2"):
        scores_from_jsonl(text.splitlines()[0] + "\n{not json}\n")


def report_inputs():
    rng = np.random.default_rng(5)
    truth = rng.random(60)
    tags = [["easy"] if t < 0.5 else ["hard"] for t in truth]
    current = [
        ScoredExample(id=str(i), tags=tags[i], scores={"acc": float(truth[i] < 0.7), "latency": 0.1 + truth[i]})
        for i in range(60)
    ]
    baseline = [ScoredExample(id=str(i), tags=tags[i], scores={"acc": float(truth[i] < 0.5), "latency": 0.2}) for i in range(60)]
    summary = summarize("org/model:v2", current, BOOT)
    deltas = {"org/model:v2": compare(current, baseline, BOOT)}
    verdict = apply_gate(GateConfig(min={"acc": 0.9}, max={"latency": 5.0}), summary, deltas["org/model:v2"])
    return summary, current, deltas, verdict


def test_markdown_report_has_every_table():
    summary, _, deltas, verdict = report_inputs()
    text = render_markdown([summary], [verdict], deltas)
    for heading in ("## Targets", "### Metrics: org/model:v2", "### Slices:", "### Baseline:", "### Gate:"):
        assert heading in text
    assert "| metric | mean | 95% CI | n | missing |" in text
    assert "| easy | acc |" in text and "| hard | latency |" in text
    assert "| min:acc |" in text and "**FAIL**" in text and "| max:latency |" in text and "pass" in text
    assert "| acc | 0.683 | 0.500 | +0.183 | [+0.100, +0.283] | yes | 60 | 60 |" in text
    plain = render_markdown([summary_of([1, 0], target="a|b")], [], {})
    assert "a\\|b" in plain and "### Baseline" not in plain and "### Gate" not in plain


def test_plots_are_png_and_skip_empty_data():
    summary, current, deltas, _ = report_inputs()
    plots = render_plots([summary], {summary.target: current}, deltas, quality_metrics=["acc"])
    assert set(plots) == {"scores_org-model-v2.png", "slices.png", "deltas.png"}
    assert all(png.startswith(b"\x89PNG") for png in plots.values())

    other = summarize("org/model:v2?", current[:30], BOOT)  # same slug: the file name must differ
    plots = render_plots([summary, other], {summary.target: current, other.target: current[:30]}, deltas)
    assert {"scores_org-model-v2.png", "scores_org-model-v2-2.png", "slices.png", "deltas.png"} == set(plots)

    empty = summarize("empty", [], BOOT)
    assert render_plots([empty], {"empty": []}, {}) == {}
    no_values = summary_of([None, None], target="none")
    assert render_plots([no_values], {"none": scored([None, None])}, {"none": {}}) == {}
    assert slugify("../../etc") == "etc" and slugify("???") == "target"
