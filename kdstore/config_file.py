"""Reading and checking a command's settings: one implementation for ``kdstore build`` and ``kdstore train``.

    values = read_toml_config("build.toml", BuildError)
    config = BuildConfig(**check_config(BuildConfig, {**values, **flags}, BuildError))

Each command merges the values under its own rules (defaults < file < flags). ``check_config`` then holds
every value against its dataclass field's annotation before anything slow happens (no model is loaded
yet): the type, strictly (TOML's ``k = "8"`` is no integer; an integer is accepted where a float is
expected), and the range or choices that ``Annotated[..., Field(...)]`` and ``Literal`` declare next to the
field. Every bad key becomes one clause of one error naming the key, the value given and what is
expected, raised as the caller's error class so the CLI prints the command's own fix-it hint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from kdstore.errors import KdstoreError

# strict: no "8" -> 8 or 1 -> True; inf and nan are valid TOML floats but no setting of ours means them
_STRICT = ConfigDict(strict=True, allow_inf_nan=False)
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "none"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def read_toml_config(path: str | Path, error_class: type[KdstoreError]) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; ``error_class`` if it cannot be read or parsed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomllib arrived in 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise error_class(f"cannot read config {path}: {exc}") from None


def check_config(cls: type, values: Mapping[str, Any], error_class: type[KdstoreError], *, prefix: str = "",
                 what: str = "invalid settings") -> dict[str, Any]:
    """``values`` held against the fields of dataclass ``cls``; returns them converted (an int given for a
    float becomes a float, a list given for a tuple a tuple).

    Raises ``error_class`` naming the unknown keys (and the known ones), else one clause per bad value:
    ``{prefix}{key} = {value}: expected {type and range}``. ``what`` opens the message.
    """
    adapters = _field_adapters(cls)
    unknown = sorted(set(values) - set(adapters))
    if unknown:
        raise error_class(f"{what}: unknown keys: {', '.join(prefix + k for k in unknown)}",
                          hint=f"known keys{f' under [{prefix[:-1]}]' if prefix else ''}: {', '.join(sorted(adapters))}")
    checked, problems = {}, []
    for key, value in values.items():
        hint, adapter = adapters[key]
        if isinstance(value, list) and typing.get_origin(_base(hint)) is tuple:
            value = tuple(value)  # TOML has no tuples
        try:
            checked[key] = adapter.validate_python(value) if adapter else _instance(hint, value)
        except (ValidationError, TypeError):
            problems.append(f"{prefix}{key} = {_toml(value)}: expected {expected(hint)}")
    if problems:
        raise error_class(f"{what}: {'; '.join(problems)}")
    return checked


@functools.cache
def _field_adapters(cls: type) -> dict[str, tuple[Any, TypeAdapter | None]]:
    """Field name -> (its resolved annotation, a strict validator; None for a dataclass, checked by type)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: (hints[f.name], None if dataclasses.is_dataclass(hints[f.name]) else TypeAdapter(hints[f.name],
                                                                                                      config=_STRICT))
            for f in dataclasses.fields(cls)}


def _instance(cls: type, value: Any) -> Any:
    if not isinstance(value, cls):  # a nested config (TrainConfig.loss) is built by its own check first
        raise TypeError(f"not a {cls.__name__}")
    return value


def _base(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def expected(hint: Any) -> str:
    """What an annotation accepts, in words: ``Annotated[int, Field(ge=1)]`` -> "an integer >= 1"."""
    base, bounds = _base(hint), []
    for extra in typing.get_args(hint)[1:] if base is not hint else ():
        for item in getattr(extra, "metadata", [extra]):  # a pydantic Field holds its bounds as metadata
            bounds += [f"{word} {getattr(item, name)}" for name, word in _BOUNDS if getattr(item, name, None) is not None]
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is typing.Literal:
        return "one of " + ", ".join(_toml(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a table of {_plural(args[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(expected(a) for a in args)
    if dataclasses.is_dataclass(base):
        return f"a {base.__name__}"
    words = _TYPE_WORDS.get(base, str(base))
    return " and ".join([f"{words} {bounds[0]}" if bounds else words, *bounds[1:]])


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(hint, expected(hint))


def _toml(value: Any) -> str:
    """A value as TOML writes it, so the user can find it in the file: "8" (a string), 8, true, [...]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)
