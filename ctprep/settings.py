"""Plain config data (YAML, JSON) into a frozen dataclass: an unknown key or a value of the wrong type is refused
by name, in one line, before any work starts.

Why: a training config read from YAML hands over what the YAML parser made of it, and YAML 1.1 reads
``lr: 1e-3`` as the *text* "1e-3" (it wants ``1.0e-3``); a dataclass takes it without a word, and the
job fails an hour later inside the optimiser with a ``TypeError`` that names neither the key nor the fix.
The annotations of the dataclass are the schema (``int``, ``float``, ``bool``, ``str``, ``X | None``,
``tuple[...]``); what they do not describe (``dict``, ``Any``) passes as given.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def _describe(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        plural = {int: "integers", float: "numbers", bool: "true/false values", str: "texts"}
        if len(set(args)) == 1 and args[0] in plural:
            count = f"{len(args)} " if Ellipsis not in typing.get_args(tp) and len(args) > 1 else ""
            return f"a list of {count}{plural[args[0]]}"
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(tp, getattr(tp, "__name__", str(tp)))


def _fits(value, tp) -> bool:
    """Whether ``value`` is what annotation ``tp`` describes (what it cannot describe passes)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True  # dict, a class, a Literal...: not checked here


def _number_text(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def check_fields(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` checked against dataclass ``cls``: unknown keys and values of the wrong type raise ``ValueError``
    naming ``where.<key>``; lists where the field is a tuple become tuples. Returns the keyword arguments."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(values).__name__} {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(fields)})")
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        tp = hints.get(name, Any)
        if not _fits(value, tp):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if _number_text(value) else ""
            raise ValueError(f"{where}.{name}: {value!r} is not {_describe(tp)}{hint}")
        out[name] = tuple(value) if isinstance(value, list) and isinstance(fields[name].default, tuple) else value
    return out
