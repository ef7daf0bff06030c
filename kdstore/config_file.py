"""Reading a command's ``--config file.toml``: one implementation for ``kdstore build`` and ``kdstore train``.

    values = read_toml_config("build.toml", BuildError, known_fields=BuildConfig.field_names())

Each command merges the values under its own rules (defaults < file < flags); this module only reads the
file and, when told the known keys, refuses others, raising the caller's error class so the CLI names
the command's own fix-it hint.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from kdstore.errors import KdstoreError


def read_toml_config(path: str | Path, error_class: type[KdstoreError],
                     known_fields: Collection[str] | None = None) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; ``error_class`` if it cannot be read or parsed.

    With ``known_fields``, top-level keys outside it are refused too, naming them and listing the known
    ones. Without it the caller checks keys itself (``kdstore train`` checks the file and the flags together).
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomllib arrived in 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        values: dict[str, Any] = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise error_class(f"cannot read config {path}: {exc}") from None
    unknown = set(values) - set(known_fields) if known_fields is not None else set()
    if unknown:
        raise error_class(f"{path} has unknown keys: {', '.join(sorted(unknown))}",
                          hint=f"known keys: {', '.join(sorted(known_fields or ()))}")
    return values
