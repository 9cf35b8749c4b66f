"""Command-line flags defined by dataclass fields: each setting's name, default and help live on
its field only.

A field made with `flag(...)` becomes `--field-name` (or metadata's own name); argparse gets the
field's default, a type from its annotation (Optional unwrapped, an Enum by its values) and the
help text; `from_args` builds the dataclass back from the parsed namespace. Light on purpose
(no torch): `apex-grpc --help` imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
_FLAG = "apex_grpc.flag"


def flag(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         name: str | None = None, repr: bool = True) -> Any:
    """A dataclass field that is also a command-line flag (name: when it is not --field-name;
    repr=False keeps a secret out of logged reprs)."""
    return dataclasses.field(default=default, repr=repr, metadata={
        _FLAG: {"help": help, "choices": choices, "name": name}})


def flag_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if _FLAG in f.metadata]


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata[_FLAG]["name"] or "--" + field.name.replace("_", "-")


def _value_type(cls: type, field: dataclasses.Field) -> type:
    """The annotation of a field, None removed from an Optional (`int | None` -> int)."""
    hint = typing.get_type_hints(cls)[field.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _is_enum(value_type: type) -> bool:
    return isinstance(value_type, type) and issubclass(value_type, enum.Enum)


def add_flags(group: argparse._ActionsContainer, cls: type, without: type | None = None) -> None:
    """One argparse option per flag field of cls, in field order, less the fields of the
    dataclass `without` (a base class whose flags another group holds)."""
    skipped = {field.name for field in dataclasses.fields(without)} if without else set()
    for field in flag_fields(cls):
        if field.name in skipped:
            continue
        spec = field.metadata[_FLAG]
        value_type = _value_type(cls, field)
        default = field.default
        kwargs: dict[str, Any] = {"dest": field.name, "help": spec["help"]}
        if value_type is bool:  # a switch: present means True (vLLM's --enforce-eager)
            if default is not False:
                raise TypeError(f"boolean flag {field.name} must default to False")
            group.add_argument(flag_name(field), action="store_true", **kwargs)
            continue
        if _is_enum(value_type):
            kwargs["choices"] = [member.value for member in value_type]
            default = default.value
        elif spec["choices"] is not None:
            kwargs["choices"] = spec["choices"]
        else:
            kwargs["type"] = value_type
            kwargs["metavar"] = flag_name(field).lstrip("-").replace("-", "_").upper()
        if default is not None:
            kwargs["help"] += " (default: %(default)s)"
        group.add_argument(flag_name(field), default=default, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """cls from the flags add_flags(cls) added; overrides replace parsed values."""
    values = {}
    for field in flag_fields(cls):
        value = getattr(args, field.name)
        value_type = _value_type(cls, field)
        values[field.name] = value_type(value) if _is_enum(value_type) else value
    return cls(**{**values, **overrides})
