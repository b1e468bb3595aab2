"""Reading the files users hand to cachefit (plans, device maps), with errors that name the file."""

from __future__ import annotations

import json
import os
from typing import Any

from cachefit.errors import ConfigError


def read_json(path: str | os.PathLike[str], *, what: str) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a ConfigError naming ``what``."""
    where = f"{what} {os.fspath(path)!r}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None
