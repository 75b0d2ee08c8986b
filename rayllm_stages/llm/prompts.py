"""Prompt templates: sandboxed Jinja2 over a row's columns, checked against the input before any run."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, meta
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from prefect_rayllm.rayllm_stages.config.base import ConfigError
from prefect_rayllm.rayllm_stages.config.models import PromptTemplate


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def template_fields(prompt: PromptTemplate) -> dict[str, set[str]]:
    """The row fields each part of the prompt reads, e.g. `{"user": {"text"}}`."""
    env = _environment()
    fields: dict[str, set[str]] = {}
    for part in ("system", "user"):
        source = getattr(prompt, part)
        if source is None:
            continue
        try:
            fields[part] = meta.find_undeclared_variables(env.parse(source))
        except TemplateError as exc:
            raise ConfigError(f"prompt.{part} is not a valid template: {exc}") from None
    return fields


def check_template_fields(prompt: PromptTemplate, columns: list[str], source: str) -> None:
    """Refuse a template that reads a field the input does not have, naming field and part."""
    available = set(columns)
    for part, needed in template_fields(prompt).items():
        missing = sorted(needed - available)
        if missing:
            raise ConfigError(
                f"prompt.{part} uses field(s) {', '.join(repr(m) for m in missing)} that {source} "
                f"lacks (its columns: {', '.join(sorted(available)) or 'none'})"
            )


def render_messages(prompt: PromptTemplate, row: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages for one row; raises `TemplateError` (e.g. a null or missing field) per row."""
    messages = []
    if prompt.system is not None:
        messages.append({"role": "system", "content": _template(prompt.system).render(row)})
    messages.append({"role": "user", "content": _template(prompt.user).render(row)})
    return messages


@lru_cache(maxsize=32)
def _template(source: str):
    return _environment().from_string(source)
