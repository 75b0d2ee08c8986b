"""What every config shares: strict pydantic models, YAML loading, and errors that name the key."""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, ValidationError, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema


class ConfigError(ValueError):
    """A job configuration that cannot run; the message names the key or field at fault."""


class InputUnavailable(ConfigError):
    """An input, dataset or model folder that is not there or not reachable from here (as opposed
    to one that is there and unfit). A job refuses to start; `rayllm validate` only warns, since the
    input may live where the job will run (a cluster's storage, a model built later)."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class JobConfig(StrictModel):
    """What every job config shares (batch, chain, evaluation, curation, rollout): where Ray runs.

    The shared fields are declared once here; the YAML keys stay top-level keys of each job's file.
    In the JSON schema (the Prefect UI's form) they come after the job's own fields.
    """

    ray_address: str | None = Field(None, description="None: local Ray; 'auto' or ray://host:10001 for a cluster")
    ray_block: str | None = Field(
        None, min_length=1, description="name of a Prefect 'RayLLM Ray Connection' block: address, namespace, runtime_env"
    )

    @model_validator(mode="after")
    def _one_ray_source(self) -> JobConfig:
        if self.ray_address is not None and self.ray_block is not None:
            raise ValueError("give ray_address or ray_block, not both")
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(core_schema)
        target = handler.resolve_ref_schema(json_schema)
        properties = target.get("properties")
        if properties:
            # the job's own fields first (a row job's input and output before them), then the shared ones
            shared = [name for base in cls.__mro__ if base in _JOB_BASES for name in base.__annotations__]
            leading = ["input", "output"] if "input" in properties else []
            own = [k for k in properties if k not in shared]
            trailing = [k for k in shared if k in properties and k not in leading]
            target["properties"] = {k: properties[k] for k in leading + own + trailing}
        return json_schema


def storage_block_field() -> Any:
    """The `storage_block` field of every model that has `storage_options`: the Prefect layer
    (`tasks.blocks.with_storage_credentials`) fills the options in memory when the job runs."""
    return Field(
        None,
        min_length=1,
        description="name of a Prefect 'RayLLM S3 Credentials' block; its options are added to storage_options when "
        "the job runs (the secret stays in the block, out of parameters, logs and outputs)",
    )


class OutputJobConfig(JobConfig):
    """A job that writes to an output folder and commits its work there as it goes (so it resumes)."""

    output: str = Field(description="fsspec URL of the output folder")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, repr=False, description="fsspec options for the job's files (e.g. client_kwargs.endpoint_url)"
    )
    storage_block: str | None = storage_block_field()
    commit_every_rows: int = Field(500, ge=1, description="rows per committed part file: the most a crash can lose")


class RowJobConfig(OutputJobConfig):
    """A job over the rows of one input file: every row ends in the results or the errors file."""

    input: str = Field(description="fsspec URL of the input file")
    id_column: str | None = Field(None, description="tables: column holding a unique row id (default: the row number)")
    max_error_rate: float = Field(
        0.05, ge=0.0, le=1.0, description="the run fails (after writing) above this share of failed rows"
    )


_JOB_BASES = (JobConfig, OutputJobConfig, RowJobConfig)

M = TypeVar("M", bound=BaseModel)
_credentials_resolver: Callable[[Any], Any] | None = None


def set_credentials_resolver(resolver: Callable[[M], M] | None) -> None:
    """Install what turns a config's `storage_block` names into `storage_options` (the Prefect layer,
    `tasks.blocks`, installs its block loader on import; this layer never imports Prefect)."""
    global _credentials_resolver
    _credentials_resolver = resolver


def with_credentials(config: M) -> M:
    """`config` with the storage options of every block it names, as a copy held in memory only;
    `config` itself when it names none.

    Raises:
        ConfigError: a block is named but no resolver is installed (or the resolver's own error:
            a block that does not exist).
    """
    if _credentials_resolver is not None:
        return _credentials_resolver(config)
    named = storage_blocks(config)
    if named:
        raise ConfigError(
            f"{named[0][0]}: the storage block {named[0][1]!r} is read through Prefect; import prefect_rayllm.tasks.blocks"
        )
    return config


def storage_blocks(model: BaseModel, prefix: str = "") -> list[tuple[str, str]]:
    """(key, block name) of every `storage_block` set in `model`, at any depth."""
    found: list[tuple[str, str]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name == "storage_block" and value:
            found.append((f"{prefix}storage_block", value))
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                found.extend(storage_blocks(item, f"{prefix}{name}{f'[{i}]' if isinstance(value, list) else ''}."))
    return found


def format_validation_error(
    error: ValidationError,
    source: str = "config",
    model: type[BaseModel] | None = None,
    lines: ConfigLines | None = None,
) -> str:
    """One line per problem, each naming the dotted key, the line of the file when known, and for an
    unknown key the closest valid one: `line 4: model.engin: unknown key (did you mean 'engine'?)`."""
    out = [f"{source} is invalid:"]
    for item in error.errors():
        loc = tuple(item["loc"])
        types_at, shown = _walk(model, loc) if model is not None else ([], loc)
        key = ".".join(str(part) for part in shown)
        if item["type"] == "extra_forbidden":
            message = "unknown key"
            close = difflib.get_close_matches(str(loc[-1]), _keys_of(_walk(model, loc[:-1])[0]) if model else [], n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        else:
            message = item["msg"].removeprefix("Value error, ")
        line = lines.line_of(loc) if lines is not None else None
        out.append(f"  {'' if line is None else f'line {line}: '}{f'{key}: ' if key else ''}{message}")
    return "\n".join(out)


def valid_keys(model: type[BaseModel], loc: tuple[Any, ...] = ()) -> list[str]:
    """The keys a mapping at `loc` inside `model` accepts (field names and aliases); [] if unknown."""
    return _keys_of(_walk(model, loc)[0])


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[Any], tuple[Any, ...]]:
    """The types a location inside `model` may hold (all union members followed), and the location
    as the user wrote it: the parts that are no key (a discriminated union's tag such as
    `exact_match`, pydantic's names of union members) are dropped."""
    types_at: list[Any] = [model]
    shown: list[Any] = []
    for position, part in enumerate(loc):
        options = [option for tp in types_at for option in _options(tp)]
        stepped = [found for tp in types_at for found in _step(tp, part)]
        if stepped and all(found in options for found in stepped):
            types_at = stepped  # a union tag: the same model(s), narrowed
        elif stepped:
            types_at = stepped
            shown.append(part)
        elif isinstance(part, int) or (position == len(loc) - 1 and any(_is_model(o) for o in options)):
            shown.append(part)  # an index, or the key at fault itself (e.g. an unknown one)
    return types_at, tuple(shown)


def _keys_of(types_at: list[Any]) -> list[str]:
    names: dict[str, None] = {}
    for tp in types_at:
        for option in _options(tp):
            if _is_model(option):
                for name, field in option.model_fields.items():
                    names.update(dict.fromkeys([name] + ([field.alias] if field.alias else [])))
    return list(names)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _options(tp: Any) -> list[Any]:
    """The members of a union (Optional, X | Y, Annotated[...] unwrapped); [tp] otherwise."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _options(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [member for arg in get_args(tp) for member in _options(arg)]
    return [tp]


def _step(tp: Any, part: Any) -> list[Any]:
    found: list[Any] = []
    for option in _options(tp):
        origin = get_origin(option)
        if _is_model(option) and isinstance(part, str):
            fields = {f.alias or name: f for name, f in option.model_fields.items()} | option.model_fields
            if part in fields:
                found.append(fields[part].annotation)
            elif any(part in get_args(f.annotation) for f in option.model_fields.values() if get_origin(f.annotation) is Literal):
                found.append(option)  # the tag of a discriminated union names this member
        elif origin in (list, tuple, set, frozenset) and isinstance(part, int):
            found.extend(arg for arg in get_args(option) if arg is not Ellipsis)
        elif origin is dict and isinstance(part, str) and len(get_args(option)) == 2:
            found.append(get_args(option)[1])
    return found


@dataclass
class ConfigLines:
    """Where each key of a YAML file is, so an error can name its line."""

    root: yaml.Node | None

    def line_of(self, loc: tuple[Any, ...]) -> int | None:
        """The line (1-based) of the deepest key of `loc` found in the file; None for the top level."""
        node, line = self.root, None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(part)), None)
                if match is None:
                    continue  # not a key (e.g. a union tag): stay here
                node, line = match[1], match[0].start_mark.line + 1
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
        return line


@dataclass
class ConfigFile:
    """A YAML config file read into a mapping, with the line of each key."""

    path: Path
    data: dict[str, Any]
    lines: ConfigLines


def read_config_file(path: str | Path) -> ConfigFile:
    """Read a YAML mapping; `ConfigError` names the file, and for bad YAML the line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text) or {}
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_describe_yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, not {type(data).__name__}")
    return ConfigFile(path, data, ConfigLines(root))


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return str(exc)
    mark = exc.problem_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    if exc.context and exc.context_mark is not None:
        text += f" ({exc.context} started at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
    snippet = mark.get_snippet()
    return text + (f"\n{snippet}" if snippet else "")


def load_config(model: type[BaseModel], path: str | Path, overrides: dict[str, Any] | None = None):
    """Load a YAML job config into `model`; `ConfigError` names the file, each bad key and its line."""
    file = read_config_file(path)
    return validate_config(model, {**file.data, **(overrides or {})}, source=str(file.path), lines=file.lines)


def validate_config(model: type[BaseModel], data: Any, source: str = "config", lines: ConfigLines | None = None):
    """`model` from `data`, or `ConfigError` with one line per problem (see `format_validation_error`)."""
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, model, lines)) from None
