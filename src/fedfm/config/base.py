"""What every config section shares: unknown keys are errors; YAML reading, ``--set`` overrides and one-line
messages for pydantic's errors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fedfm.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _Loader(yaml.SafeLoader):
    """YAML loader that reads ``1e-3`` as a float, as YAML 1.2 does (PyYAML follows YAML 1.1, which
    needs a dot: ``1.0e-3``) — learning rates are written this way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _section_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the (nested) section at ``loc``; used to enrich unknown-key messages."""
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (continual.stages.0)
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)  # list[Section]
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def format_error(err: ValidationError, model: type[BaseModel]) -> str:
    """pydantic's errors as one line; an unknown key names the valid keys of its section of ``model``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            valid = _section_fields(model, e["loc"])
            lines.append(f"unknown config key '{loc}'; valid keys here: {', '.join(valid)}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"invalid value for '{loc}': {e['msg']}{got_s}")
    return "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'strategy.name=fedprox'`` -> (['strategy', 'name'], 'fedprox'); values parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict, creating sections as needed."""
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            nxt = node[k]
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
            node = nxt
        node[keys[-1]] = value
    return raw


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; a missing file or bad YAML is a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = _yaml(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level")
    return raw
