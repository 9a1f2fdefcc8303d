"""Every config key with its type, default and help text, from the typed schema itself: what `saepipe config keys`
prints and what the README's configuration reference is generated from (a test keeps the two equal)."""
from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class Key:
    name: str  # dotted
    type: str
    default: str  # "—" when required
    help: str


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + (" | null" if type(None) in args else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _submodel(annotation) -> type[BaseModel] | None:
    candidates = typing.get_args(annotation) or (annotation,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def config_keys(model: type[BaseModel], prefix: str = "") -> list[Key]:
    keys: list[Key] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _submodel(field.annotation)
        if sub is not None:
            if not field.is_required() and field.default is None:  # an optional section: off unless given
                keys.append(Key(dotted, "section", "null", field.description or ""))
            keys.extend(config_keys(sub, f"{dotted}."))
            continue
        if field.is_required():
            default = "—"
        elif field.default_factory is not None:
            default = json.dumps(field.default_factory(), default=str)
        else:
            default = "null" if field.default is None or field.default is PydanticUndefined else json.dumps(
                field.default, default=str)
        keys.append(Key(dotted, _type_name(field.annotation), default, field.description or ""))
    return keys


def markdown_table(model: type[BaseModel]) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for k in config_keys(model):
        lines.append(f"| `{k.name}` | `{k.default}` | {k.help.replace('|', '/')} |")
    return "\n".join(lines)


def text_listing(model: type[BaseModel]) -> str:
    keys = config_keys(model)
    width = max(len(k.name) for k in keys)
    return "\n".join(f"{k.name:<{width}}  {k.default:<12}  {k.help}" for k in keys)
