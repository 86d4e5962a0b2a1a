"""Settings from TOML files, for commands that take ``--config FILE``."""

from __future__ import annotations

import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from falconet.errors import FalconetError


def toml_loads(text: str) -> dict[str, Any]:
    """Parse TOML, turning its errors into ValueError with the position."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None


def command_defaults(path: str, command: str) -> dict[str, Any]:
    """The [command] table of a TOML file as click defaults (dashes become underscores).

    Keys may be written as on the command line (``max-executors``) or with underscores.
    """
    try:
        with open(path, "rb") as fh:
            doc = toml_loads(fh.read().decode())
    except OSError as exc:
        raise FalconetError(f"cannot read config file {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FalconetError(f"config file {path}: {exc}") from None
    table = doc.get(command, {})
    if not isinstance(table, dict):
        raise FalconetError(f"config file {path}: [{command}] must be a table")
    return {k.replace("-", "_"): v for k, v in table.items()}
