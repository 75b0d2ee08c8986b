"""Evaluation report: a Markdown summary and PNG plots of the scores, slices and baseline deltas.

    markdown = render_markdown(summaries, verdicts, {"small": deltas})
    pngs = render_plots(summaries, {"small": scored}, {"small": deltas}, quality_metrics=["exact_match"])
    # pngs == {"scores_small.png": b"\\x89PNG...", "slices.png": ..., "deltas.png": ...}

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend), imported only when plotting.
A plot without data is left out rather than drawn empty.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from prefect_rayllm.rayllm_stages.evaluation.metrics import ScoredExample
from prefect_rayllm.rayllm_stages.evaluation.stats import MetricDelta, MetricSummary, TargetSummary, Verdict

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_MISSING = "–"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return _MISSING
    if abs(value) >= 100:
        return f"{value:+.1f}" if signed else f"{value:.1f}"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _interval(low: float | None, high: float | None, signed: bool = False) -> str:
    if low is None or high is None:
        return _MISSING
    return f"[{_number(low, signed)}, {_number(high, signed)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines + [""]


def _percent(confidence: float) -> str:
    return f"{confidence * 100:g}% CI"


def _metrics_section(summary: TargetSummary) -> list[str]:
    rows = [[m.name, _number(m.mean), _interval(m.ci_low, m.ci_high), m.n, m.n_missing] for m in summary.metrics.values()]
    return (
        [f"### Metrics: {_cell(summary.target)}", ""]
        + _table(["metric", "mean", _percent(summary.confidence), "n", "missing"], rows)
        + ["Intervals: Wilson score for 0/1 metrics, percentile bootstrap for the others.", ""]
    )


def _slices_section(summary: TargetSummary) -> list[str]:
    if not summary.slices:
        return []
    rows = [
        [tag, m.name, _number(m.mean), _interval(m.ci_low, m.ci_high), m.n]
        for tag, metrics in summary.slices.items()
        for m in metrics.values()
    ]
    return [f"### Slices: {_cell(summary.target)}", ""] + _table(
        ["tag", "metric", "mean", _percent(summary.confidence), "n"], rows
    )


def _deltas_section(target: str, deltas: Mapping[str, MetricDelta], confidence: float) -> list[str]:
    if not deltas:
        return []
    rows = [
        [
            d.metric,
            _number(d.current),
            _number(d.baseline),
            _number(d.delta, signed=True),
            _interval(d.ci_low, d.ci_high, signed=True),
            "yes" if d.paired else "no",
            d.n_current,
            d.n_baseline,
        ]
        for d in deltas.values()
    ]
    header = ["metric", "current", "baseline", "delta", _percent(confidence), "paired", "n current", "n baseline"]
    return [f"### Baseline: {_cell(target)}", ""] + _table(header, rows)


def _gate_section(verdict: Verdict) -> list[str]:
    result = "PASSED" if verdict.passed else "FAILED"
    lines = [f"### Gate: {_cell(verdict.target)}: {result}", ""]
    if not verdict.checks:
        return lines + ["No gate thresholds.", ""]
    rows = [[c.name, _number(c.value), f"{c.threshold:g}", "pass" if c.passed else "**FAIL**", c.detail] for c in verdict.checks]
    return lines + _table(["check", "value", "threshold", "result", "detail"], rows)


def render_markdown(
    summaries: Sequence[TargetSummary],
    verdicts: Sequence[Verdict],
    deltas_by_target: Mapping[str, Mapping[str, MetricDelta]],
) -> str:
    """The report: an overview table, then per target its metrics, slices, baseline deltas and gate."""
    verdict_of = {verdict.target: verdict for verdict in verdicts}
    overview = [
        [
            s.target,
            s.examples,
            s.failed,
            s.judge_errors,
            _MISSING if s.target not in verdict_of else ("passed" if verdict_of[s.target].passed else "**FAILED**"),
        ]
        for s in summaries
    ]
    lines = ["# Evaluation report", "", "## Targets", ""]
    lines += _table(["target", "examples", "failed", "judge errors", "gate"], overview)
    for summary in summaries:
        lines += [f"## {_cell(summary.target)}", ""]
        lines += _metrics_section(summary)
        lines += _slices_section(summary)
        lines += _deltas_section(summary.target, deltas_by_target.get(summary.target) or {}, summary.confidence)
        if summary.target in verdict_of:
            lines += _gate_section(verdict_of[summary.target])
    return "\n".join(lines)


def slugify(name: str) -> str:
    """A file-name-safe form of a target name ("org/model:v2" -> "org-model-v2")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "target"


def _unique_slugs(targets: Sequence[str]) -> dict[str, str]:
    slugs: dict[str, str] = {}
    for target in targets:
        slug, suffix = slugify(target), 2
        while slug in slugs.values():
            slug, suffix = f"{slugify(target)}-{suffix}", suffix + 1
        slugs[target] = slug
    return slugs


def _grid(panels: int) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(3, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[panels:]:
        unused.set_visible(False)
    return figure, axes[:panels]


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _error_bars(means: Sequence[float], lows: Sequence[float | None], highs: Sequence[float | None]) -> list[list[float]]:
    below = [mean - low if low is not None else 0.0 for mean, low in zip(means, lows, strict=False)]
    above = [high - mean if high is not None else 0.0 for mean, high in zip(means, highs, strict=False)]
    return [below, above]


# One bar: (mean, ci_low, ci_high); None leaves the bar out.
_Bar = tuple[float, float | None, float | None] | None


def _grouped_bars(axes: Axes, groups: list[str], series: dict[str, list[_Bar]]) -> None:
    """Bars per group (x axis) and series (colour), with interval error bars."""
    width = 0.8 / len(series)
    for index, (label, bars) in enumerate(series.items()):
        offset = (index - (len(series) - 1) / 2) * width
        kept = [(group + offset, bar) for group, bar in enumerate(bars) if bar is not None]
        means = [bar[0] for _, bar in kept]
        yerr = _error_bars(means, [bar[1] for _, bar in kept], [bar[2] for _, bar in kept])
        axes.bar([x for x, _ in kept], means, width, label=label, yerr=yerr, capsize=3)
    crowded = len(groups) > 3
    axes.set_xticks(range(len(groups)), groups, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    if len(series) > 1:
        axes.legend(fontsize="small")


def _scores_plot(
    target: str, scored: Sequence[ScoredExample], metrics: list[str], quality: Collection[str] | None
) -> bytes | None:
    columns = {name: [v for example in scored if (v := example.scores.get(name)) is not None] for name in metrics}
    columns = {name: values for name, values in columns.items() if values}
    if not columns:
        return None
    figure, axes = _grid(len(columns))
    for ax, (name, values) in zip(axes, columns.items(), strict=False):
        bounded = quality is not None and name in quality
        ax.hist(values, bins=[i / 10 for i in range(11)] if bounded else "auto", edgecolor="white")
        ax.set_title(name)
        ax.set_xlabel("score" if bounded else "value")
        ax.set_ylabel("examples")
    figure.suptitle(f"Per-example scores: {target}")
    return _png(figure)


def _slices_plot(summaries: Sequence[TargetSummary], metrics: list[str]) -> bytes | None:
    tags = sorted({tag for s in summaries for tag in s.slices})
    panels: dict[str, dict[str, list[_Bar]]] = {}
    for name in metrics:
        series: dict[str, list[_Bar]] = {}
        for summary in summaries:
            values: list[_Bar] = []
            for tag in tags:
                m: MetricSummary | None = summary.slices.get(tag, {}).get(name)
                values.append(None if m is None or m.mean is None else (m.mean, m.ci_low, m.ci_high))
            if any(values):
                series[summary.target] = values
        if series:
            panels[name] = series
    if not panels:
        return None
    figure, axes = _grid(len(panels))
    for ax, (name, series) in zip(axes, panels.items(), strict=False):
        _grouped_bars(ax, tags, series)
        ax.set_title(name)
        ax.set_ylabel("mean")
    figure.suptitle("Metrics by tag")
    return _png(figure)


def _deltas_plot(
    targets: list[str], deltas_by_target: Mapping[str, Mapping[str, MetricDelta]], metrics: list[str]
) -> bytes | None:
    panels: dict[str, list[_Bar]] = {}
    for name in metrics:
        values: list[_Bar] = []
        for target in targets:
            d = (deltas_by_target.get(target) or {}).get(name)
            values.append(None if d is None or d.delta is None else (d.delta, d.ci_low, d.ci_high))
        if any(values):
            panels[name] = values
    if not panels:
        return None
    figure, axes = _grid(len(panels))
    for ax, (name, values) in zip(axes, panels.items(), strict=False):
        _grouped_bars(ax, targets, {"delta": values})
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(name)
        ax.set_ylabel("current - baseline")
    figure.suptitle("Change vs baseline")
    return _png(figure)


def render_plots(
    summaries: Sequence[TargetSummary],
    scored_by_target: Mapping[str, Sequence[ScoredExample]],
    deltas_by_target: Mapping[str, Mapping[str, MetricDelta]],
    quality_metrics: Collection[str] | None = None,
) -> dict[str, bytes]:
    """PNG plots by file name: `scores_<target>.png`, `slices.png`, `deltas.png` (each only with data).

    `quality_metrics` (e.g. `eval_metrics.quality_metric_names(metrics)`) limits the score histograms
    to those metrics, on a fixed [0, 1] axis; None plots every metric with automatic bins. Slices and
    deltas get one panel per metric, since measurements and quality scores do not share a scale.
    """
    targets = list(dict.fromkeys([*(s.target for s in summaries), *scored_by_target, *deltas_by_target]))
    slugs = _unique_slugs(targets)
    plots: dict[str, bytes] = {}
    for target in targets:
        scored = scored_by_target.get(target) or []
        names = _names(s.metrics for s in summaries if s.target == target) or _names(e.scores for e in scored)
        if quality_metrics is not None:
            names = [name for name in names if name in quality_metrics]
        if png := _scores_plot(target, scored, names, quality_metrics):
            plots[f"scores_{slugs[target]}.png"] = png
    all_names = _names(s.metrics for s in summaries)
    if png := _slices_plot(summaries, all_names):
        plots["slices.png"] = png
    delta_names = _names(deltas_by_target.values())
    if png := _deltas_plot([t for t in targets if deltas_by_target.get(t)], deltas_by_target, delta_names):
        plots["deltas.png"] = png
    return plots


def _names(mappings: Iterable[Iterable[str]]) -> list[str]:
    """Keys of several mappings, in first-seen order."""
    names: dict[str, None] = {}
    for mapping in mappings:
        names.update(dict.fromkeys(mapping))
    return list(names)
