"""YAML loading with dotted `key=value` overrides, validated into the typed schema."""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


def apply_override(data: dict, assignment: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML so numbers, bools and lists keep their type."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form dotted.key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def _one_line(err: ValidationError, source: str) -> str:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")  # pydantic's label for a validator's ValueError
        # A validator's own message usually names its key already ("task: ..."): don't say it twice.
        problems.append(msg if msg.startswith(f"{loc}:") or msg.startswith(f"{loc.split('.')[-1]}:") else f"{loc}: {msg}")
    return f"{source}: invalid config: " + "; ".join(problems)


def validate(model: type[T], data: dict, source: str = "<config>") -> T:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None


def read_mapping(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping (an empty file: {}), or a one-line ConfigError."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read config: {str(err).splitlines()[0]}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded or {}


def load_config(model: type[T], path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> T:
    data: dict = dict(base or {})
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data.update(read_mapping(path))
    for assignment in overrides:
        apply_override(data, assignment)
    return validate(model, data, source)
