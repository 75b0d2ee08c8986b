"""Every job kind in one table: its config model, how its YAML file is recognised, and the checks
that run before any runtime starts.

`rayllm validate` uses all of it; `rayllm batch|chain|curate|evaluate|rollout` run `check_job` on
their config before they start Ray or a Prefect server, so a missing input, a file in the wrong
format or a template field the input lacks costs a second, not an engine start. Nothing here
imports Ray, Prefect or vLLM.

    kind        config model                                  input checked before any runtime
    batch       config.models.BatchJobConfig                  `input` (exists, format, first lines, template fields)
    chain       config.models.ChainJobConfig                  `input` (exists, table, id column, every step's fields)
    evaluation  evaluation.config.EvaluationConfig            `dataset.path` (examples, references), baseline scores
    curation    curation.config.CurationConfig                `source.url` or `source.manifest` (exists, first entries)
    rollout     rollout.config.RolloutConfig                  `evaluation.dataset.path`, when the rollout evaluates

Every kind also checks its local model folders (`./models/tiny`, `/models/x`, `file://...`) when
it runs on a local Ray (no `ray_address`): on a cluster, a path names the workers' filesystem.
"""

from __future__ import annotations

import importlib
import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from prefect_rayllm.rayllm_stages.config.base import ConfigError, InputUnavailable, read_config_file, validate_config
from prefect_rayllm.rayllm_stages.config.models import ModelSpec
from prefect_rayllm.rayllm_stages.io.storage import Location

# kind -> "module:Class" of its config model (imported when needed)
CONFIG_MODELS: dict[str, str] = {
    "batch": "prefect_rayllm.rayllm_stages.config.models:BatchJobConfig",
    "chain": "prefect_rayllm.rayllm_stages.config.models:ChainJobConfig",
    "evaluation": "prefect_rayllm.rayllm_stages.evaluation.config:EvaluationConfig",
    "curation": "prefect_rayllm.rayllm_stages.curation.config:CurationConfig",
    "rollout": "prefect_rayllm.rayllm_stages.rollout.config:RolloutConfig",
}
KINDS = tuple(CONFIG_MODELS)
# Lines read from the head of an input to judge its format (a malformed line among them is a row error).
HEAD_LINES = 100
# Exceptions that are bugs, not an unreadable input: they are not turned into a ConfigError.
_BUGS = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError, NotImplementedError)


def config_model(kind: str) -> type[BaseModel]:
    """The pydantic model of a job kind's config."""
    if kind not in CONFIG_MODELS:
        raise ConfigError(f"unknown job kind {kind!r} (kinds: {', '.join(KINDS)})")
    module, name = CONFIG_MODELS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def detect_kind(data: Mapping[str, Any], source: str = "config") -> str:
    """The kind whose config model knows the most of the file's top-level keys.

    Raises:
        ConfigError: no kind knows any key, or two kinds know as many (then `--kind` decides).
    """
    keys = set(data)
    scores = {kind: len(keys & _field_names(config_model(kind))) for kind in KINDS}
    best = max(scores.values())
    winners = [kind for kind, score in scores.items() if score == best]
    if best == 0 or len(winners) > 1:
        among = ", ".join(winners) if best else ", ".join(KINDS)
        raise ConfigError(
            f"{source}: cannot tell the job kind from its keys ({', '.join(sorted(keys)) or 'none'}); "
            f"give it with --kind ({among})"
        )
    return winners[0]


def load_job_config(path: str | Path, kind: str | None = None, overrides: dict[str, Any] | None = None) -> tuple[str, Any]:
    """Read a job's YAML file: `(kind, config)`, the kind given or detected from the keys.

    Raises:
        ConfigError: the file is missing or not YAML (line and column named), or a key is wrong
            (named with its line, and the closest valid key for an unknown one).
    """
    file = read_config_file(path)
    kind = kind or detect_kind(file.data, str(file.path))
    data = {**file.data, **(overrides or {})}
    return kind, validate_config(config_model(kind), data, source=str(file.path), lines=file.lines)


def check_job(kind: str, config: Any, count: bool = False) -> str:
    """Check a job's input (and local model folders) as its run would, before any runtime starts.

    Returns a one-line summary of what was checked (with the row count when `count`).

    Raises:
        ConfigError: the input is missing, unreadable, in another format, or does not fit the
            config (the key and the path are named).
    """
    return _CHECKS[kind](config, count)


# -- one check per kind ----------------------------------------------------------------------------
def _check_batch(config: Any, count: bool) -> str:
    from prefect_rayllm.rayllm_stages.io.batch_input import check_input, count_rows

    fmt = _reading(config.input, lambda: check_input(config))
    _check_head(config.input, config.storage_options, fmt)
    _check_models([("model", config.model)], config.ray_address)
    rows = f" with {_reading(config.input, lambda: count_rows(config, fmt))} rows" if count else ""
    return f"{config.input} is {fmt}{rows}"


def _check_chain(config: Any, count: bool) -> str:
    from prefect_rayllm.rayllm_stages.io.batch_input import count_rows
    from prefect_rayllm.rayllm_stages.jobs.chain import ChainJob

    fmt = _reading(config.input, ChainJob(config).check_input)
    _check_head(config.input, config.storage_options, fmt)
    _check_models([(f"steps[{i}] ({s.name}).model", s.model) for i, s in enumerate(config.steps)], config.ray_address)
    rows = f" with {_reading(config.input, lambda: count_rows(config, fmt))} rows" if count else ""
    return f"{config.input} is a {fmt} table{rows}; steps: {' -> '.join(s.name for s in config.steps)}"


def _check_evaluation(config: Any, count: bool, key: str = "") -> str:
    from prefect_rayllm.rayllm_stages.evaluation.run import check_evaluation

    path = config.dataset.path
    if not _reading(path, Location(path, config.storage_options).exists):
        raise InputUnavailable(f"{key}dataset.path: {path} does not exist")
    examples = _reading(path, lambda: check_evaluation(config))
    baseline = config.baseline
    if baseline is not None and baseline.scores:
        options = baseline.storage_options or config.storage_options
        if not _reading(baseline.scores, Location(baseline.scores, options).exists):
            raise InputUnavailable(f"{key}baseline.scores: {baseline.scores} does not exist")
    models = [(f"{key}targets[{i}] ({t.name}).model", t.model) for i, t in enumerate(config.targets)]
    _check_models(models + ([(f"{key}judge.model", config.judge.model)] if config.judge else []), config.ray_address)
    return f"{config.dataset.path}: {examples} examples; targets: {', '.join(t.name for t in config.targets)}"


def _check_curation(config: Any, count: bool) -> str:
    from prefect_rayllm.rayllm_stages.curation.source import iter_image_uris, iter_manifest_uris

    source = config.source
    key, url = ("source.url", source.url) if source.url is not None else ("source.manifest", source.manifest)
    location = Location(url, source.storage_options)
    if not _reading(url, location.exists):
        raise InputUnavailable(f"{key}: {url} does not exist")
    if source.manifest is not None:
        head = _reading(url, lambda: list(itertools.islice(iter_manifest_uris(location), HEAD_LINES)))
        if not head:
            raise ConfigError(f"{key}: {url} lists no image")
    first = _reading(url, lambda: next(iter_image_uris(source), None))
    if first is None:
        globs = f" matching include {source.include} and exclude {source.exclude}" if source.include or source.exclude else ""
        raise ConfigError(f"{key}: {url} holds no image{globs}")
    _check_models([("model", config.model)], config.ray_address)
    images = f" with {sum(1 for _ in iter_image_uris(source))} images" if count else ""
    return f"{url}{images} (first: {first})"


def _check_rollout(config: Any, count: bool) -> str:
    evaluation = config.evaluation_config("http://127.0.0.1:1/v1", "v-check")
    summary = "" if evaluation is None else "; evaluation " + _check_evaluation(evaluation, count, key="evaluation.")
    _check_models([("candidate", config.candidate)], config.ray_address)
    return f"candidate {config.candidate.source} for endpoint {config.endpoint}{summary}"


_CHECKS: dict[str, Callable[[Any, bool], str]] = {
    "batch": _check_batch,
    "chain": _check_chain,
    "evaluation": _check_evaluation,
    "curation": _check_curation,
    "rollout": _check_rollout,
}


# -- shared pieces -------------------------------------------------------------------------------
def _check_models(specs: Iterable[tuple[str, ModelSpec]], ray_address: str | None) -> None:
    """A model source that is a local path must exist, when the job runs on this machine's Ray."""
    if ray_address is not None:
        return
    for key, spec in specs:
        if spec.engine == "http":
            continue
        path = local_model_path(spec.source)
        if path is not None and not path.exists():
            raise InputUnavailable(f"{key}.source: {spec.source} does not exist (a model folder on this machine)")


def local_model_path(source: str) -> Path | None:
    """The local path a model source names, or None for a hub id or a remote URL.

    `./m`, `../m`, `/m`, `~/m` and `file:///m` are paths; `org/name` could be either, as for vLLM,
    and is left to the engine.
    """
    if source.startswith("file://"):
        return Path(source.removeprefix("file://"))
    if source.startswith(("/", "./", "../", "~")) or source in (".", ".."):
        return Path(source).expanduser()
    return None


def _check_head(url: str, storage_options: dict[str, Any], fmt: str) -> None:
    """The input has rows, and a JSONL input's first lines hold what its format needs: at least one
    OpenAI Batch request (a line with custom_id and body), or one JSON object for a table.

    Malformed lines among good ones are not refused here: they become row errors in the run.
    """
    if fmt == "parquet":
        return
    location = Location(url, storage_options)
    head = _reading(url, lambda: [line for line in itertools.islice(_non_blank(location), HEAD_LINES)])
    if not head:
        raise ConfigError(f"input: {url} is empty")
    records = [_json_object(line) for line in head]
    if fmt == "openai_batch" and not any(r is not None and "custom_id" in r and "body" in r for r in records):
        raise ConfigError(
            f"input: {url} is not OpenAI Batch JSONL: none of its first {len(head)} line(s) is a request with "
            f"custom_id and body (line 1: {_excerpt(head[0])}); a table needs input_format jsonl and a prompt"
        )
    if fmt != "openai_batch" and all(r is None for r in records):
        raise ConfigError(
            f"input: {url} is not a JSONL table: none of its first {len(head)} line(s) is a JSON object "
            f"(line 1: {_excerpt(head[0])})"
        )


def _non_blank(location: Location) -> Iterable[str]:
    return (line for line in location.iter_lines() if line.strip())


def _json_object(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _excerpt(line: str, limit: int = 80) -> str:
    line = line.strip()
    return repr(line if len(line) <= limit else line[:limit] + "…")


def _reading(url: str, read: Callable[[], Any]) -> Any:
    """Run a read of `url`; a storage or decoding failure becomes a `ConfigError` naming the URL."""
    try:
        return read()
    except ConfigError:
        raise
    except _BUGS:
        raise
    except FileNotFoundError:
        raise InputUnavailable(f"{url} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{url} is not UTF-8 text (a Parquet file needs the .parquet suffix or input_format: parquet)"
        ) from None
    except Exception as exc:
        raise InputUnavailable(f"{url} cannot be read: {type(exc).__name__}: {exc}") from None


def _field_names(model: type[BaseModel]) -> set[str]:
    return {alias for name, field in model.model_fields.items() for alias in (name, field.alias) if alias}


# -- resume ----------------------------------------------------------------------------------------
def check_resume(kind: str, config: Any, overwrite: bool = False) -> None:
    """Refuse, as the job's `prepare` would, to resume an output that holds a run made with other
    settings: here, before any runtime starts, instead of inside the flow.

    Raises:
        ResumeRefused: naming the output and each changed setting, unless `overwrite`.
    """
    if overwrite:
        return
    for job in _resumable_jobs(kind, config):
        # The lifecycle's own check (jobs.lifecycle): a new output is not read further, so an input
        # that a later job of the run writes (an evaluation's judge reads the answers) need not exist yet.
        _reading(job.config.output, job.check_resume)


def _resumable_jobs(kind: str, config: Any) -> list[Any]:
    """The resumable jobs a run of `config` prepares (an evaluation: each target's answer and judge chains)."""
    if kind == "batch":
        from prefect_rayllm.rayllm_stages.jobs.batch import BatchJob

        return [BatchJob(config)]
    if kind == "chain":
        from prefect_rayllm.rayllm_stages.jobs.chain import ChainJob

        return [ChainJob(config)]
    if kind == "curation":
        from prefect_rayllm.rayllm_stages.curation.run import CurationJob

        return [CurationJob(config)]
    if kind == "evaluation":
        from prefect_rayllm.rayllm_stages.evaluation.run import answer_chain_config, judge_chain_config
        from prefect_rayllm.rayllm_stages.jobs.chain import ChainJob

        chains = [answer_chain_config(config, target) for target in config.targets]
        chains += [judge for target in config.targets if (judge := judge_chain_config(config, target)) is not None]
        return [ChainJob(chain) for chain in chains]
    return []  # a rollout keeps no run log: a retry reuses the version it deployed
