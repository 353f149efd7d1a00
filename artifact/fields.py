"""Check a dataclass built from a JSON file against its own annotations, so that a hand-edited or hostile
file is refused when it is read, not where a wrong type first meets an f-string or a path join.

Covers what the manifests' dataclasses use: str, int, float, bool, None, Any, list[X], dict[K, V], unions
(`X | None`, `int | str`) and nested dataclasses. An int is not a bool here (JSON's true is not a count),
and a float field takes an int (JSON writes 3.0 as 3 in some tools).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def check_fields(obj: Any, where: str = "") -> None:
    """ValueError naming the first field of `obj` (a dataclass instance, checked recursively) whose value does
    not have its annotated type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _check(getattr(obj, f.name), hints[f.name], f"{where}{f.name}")


def _check(value: Any, tp: Any, where: str) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                _check(value, option, where)
                return
            except ValueError:
                continue
        raise ValueError(f"{where}: expected {_name(tp)}, got {_shown(value)}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise ValueError(f"{where}: expected an object, got {_shown(value)}")
        check_fields(value, f"{where}.")
        return
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {_shown(value)}")
        for i, item in enumerate(value):
            _check(item, args[0], f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object, got {_shown(value)}")
        for key, item in value.items():
            _check(key, args[0], f"{where} key")
            _check(item, args[1], f"{where}[{key!r}]")
        return
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is type(None):
        ok = value is None
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ValueError(f"{where}: expected {_name(tp)}, got {_shown(value)}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
