"""Method hyperparameters from the command line, read against each field's declared type.

``-p NAME=VALUE`` (generate, demo, profile) and ``name:param=v`` (bench ``--methods``) give every value as
text. :func:`coerce_params` converts it to the type the method's dataclass field declares, so a wrong value
is a one-line ``ValueError`` naming the parameter and the expected type (``snapkv: parameter window takes an
int, got 'abc'``) instead of a ``TypeError`` deep inside the cache. It reads the fields of whatever is
registered in :data:`kvsqueeze.methods.METHODS`, so a new method needs nothing here.

Accepted text per type: int ``16`` (not ``1.5``); float ``0.5``, ``1``, ``1e-3``; bool ``true/false``,
``yes/no``, ``1/0`` (any case); str as given, without surrounding quotes; tuple ``0,1,23`` or ``(0,1)``
(elements read by the tuple's element type); ``X | None`` also ``none``; ``Literal`` one of its values; an
``Enum`` one of its values or names. A field whose type is none of these is read as a Python literal when it
is one, else kept as text (the command line's behaviour before typed parsing).
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Mapping

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


class _Mismatch(Exception):
    """The text does not read as the expected type (internal: :func:`coerce_value` turns it into a message)."""


def parse_assignment(text: str) -> tuple[str, str]:
    """Split ``name=value`` into the stripped name and the value text (``ValueError`` without ``=``)."""
    if "=" not in text:
        raise ValueError(f"a method parameter is name=value, got {text!r}")
    name, raw = text.split("=", 1)
    return name.strip(), raw


def _method_key(method_name: str) -> str:
    """The registry key :func:`kvsqueeze.methods.get_method` looks a name up by."""
    return str(method_name).strip().lower().replace("-", "_")


def _hyperparameters(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are hyperparameters (not internal state such as loaded weights)."""
    from kvsqueeze.methods import hyperparameters

    return hyperparameters(cls)


@functools.cache
def field_types(cls: type) -> dict[str, object]:
    """The declared type of each hyperparameter of ``cls`` (``None`` where it cannot be resolved)."""
    fields = _hyperparameters(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation naming something only imported for type checking
        hints = {}
    return {f.name: hints.get(f.name, None if isinstance(f.type, str) else f.type) for f in fields}


def describe_type(hint: object) -> str:
    """The expected type in words, as the error message says it: ``an int``, ``a tuple of ints``, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        members = [describe_type(a) for a in args if a is not type(None)]
        if type(None) in args:
            members.append("none")
        return " or ".join(members)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is bool:
        return "a bool (true/false, yes/no, 1/0)"
    if hint is int:
        return "an int"
    if hint is float:
        return "a float"
    if hint is str:
        return "a string"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    if hint in (tuple, list) or origin in (tuple, list):
        kind = "tuple" if tuple in (hint, origin) else "list"
        if len(args) == 2 and args[1] is Ellipsis:
            element = describe_type(args[0]).removeprefix("an ").removeprefix("a ")
            return f"a {kind} of {element}s (comma separated, e.g. 0,1,23)"
        if args and args != ((),):
            return f"a {kind} of {len(args)} ({', '.join(describe_type(a) for a in args)}), comma separated"
        return f"a {kind} (comma separated, e.g. 0,1,23)"
    return getattr(hint, "__name__", str(hint))


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _sequence_items(text: str) -> list[str]:
    """``0,1,23``, ``(0,1)``, ``[0, 1]``, ``(0,)`` -> the element texts; ``()`` or nothing -> []."""
    text = text.strip()
    if len(text) >= 2 and (text[0], text[-1]) in (("(", ")"), ("[", "]")):
        text = text[1:-1].strip()
    if not text:
        return []
    items = [item.strip() for item in text.split(",")]
    if items[-1] == "":  # a trailing comma: "(0,)"
        items.pop()
    if any(item == "" for item in items):
        raise _Mismatch
    return items


def _convert(text: str, hint: object) -> object:
    """``text`` read as ``hint``; :class:`_Mismatch` when it does not read as one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    stripped = text.strip()
    if hint is None or hint is typing.Any:
        return _literal(text)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and _unquote(stripped).lower() == "none":
            return None
        for member in args:
            if member is type(None):
                continue
            try:
                return _convert(text, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        for choice in args:
            if _unquote(stripped) == str(choice.value if isinstance(choice, enum.Enum) else choice):
                return choice
        raise _Mismatch
    if hint is bool:
        word = _unquote(stripped).lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise _Mismatch
    if hint is int:
        try:
            return int(stripped)
        except ValueError:
            raise _Mismatch from None
    if hint is float:
        try:
            return float(stripped)
        except ValueError:
            raise _Mismatch from None
    if hint is str:
        return _unquote(text)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        word = _unquote(stripped)
        for member in hint:
            if word in (str(member.value), member.name) or word.lower() == member.name.lower():
                return member
        raise _Mismatch
    if hint in (tuple, list) or origin in (tuple, list):
        items = _sequence_items(text)
        if len(args) == 2 and args[1] is Ellipsis:
            values = [_convert(item, args[0]) for item in items]
        elif args and args != ((),):
            if len(items) != len(args):
                raise _Mismatch
            values = [_convert(item, a) for item, a in zip(items, args, strict=True)]
        else:
            values = [_literal(item) for item in items]
        return tuple(values) if tuple in (hint, origin) else values
    return _literal(text)  # a type this module does not know: as before typed parsing


def coerce_value(method_name: str, param: str, text: str, hint: object) -> object:
    """``text`` converted to ``hint``, or a one-line ``ValueError`` naming the parameter and the type."""
    try:
        return _convert(text, hint)
    except _Mismatch:
        raise ValueError(
            f"{method_name}: parameter {param} takes {describe_type(hint)}, got {text!r}"
        ) from None


def coerce_params(method_name: str, raw: Mapping[str, object]) -> dict[str, object]:
    """Convert command-line parameter texts to the types the method's fields declare.

    ``method_name`` is a registered name or a composition ``EVICTION+QUANTIZATION``; each parameter is read
    by the field of the method that has it. Values that are not text, names no method (or both methods of a
    composition) has, and parameters of an unknown method are passed through unchanged, for
    :func:`kvsqueeze.methods.get_method` to report with its own message.
    """
    from kvsqueeze.methods import METHODS

    names = [name for name in _method_key(method_name).split("+") if name in METHODS]
    types_of = {name: field_types(METHODS[name]) for name in names}
    out: dict[str, object] = {}
    for param, value in raw.items():
        owners = [name for name in names if param in types_of[name]]
        if not isinstance(value, str) or len(owners) != 1:
            out[param] = value
            continue
        owner = owners[0]
        out[param] = coerce_value(owner, param, value, types_of[owner][param])
    return out
