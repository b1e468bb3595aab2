"""``ConfigReader``: typed reads of a parsed ``config.json``, for the family adapters.

Every read says what the ``transformers`` config class does with the key: required (a sizing tool
must not guess it), a class default when absent (recorded in the spec's notes when it shapes a
weight), and what an explicit JSON ``null`` means. Every error names the key, the file and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cachefit.errors import ConfigError
from cachefit.limits import check_limit

REQUIRED: Any = object()
"""Sentinel for ``absent``: the key must be present."""
REJECT: Any = object()
"""Sentinel for ``null``: an explicit JSON null is an error."""

# keys that set how many times a table is repeated, and the limit each is checked against
_COUNT_LIMITS = {"num_hidden_layers": "MAX_LAYERS", "n_layer": "MAX_LAYERS"}


class ConfigReader:
    """Typed reads of a parsed config for one family adapter, and the notes the spec will carry.

    Args:
        data: the parsed ``config.json``.
        where: the file (or a label for a dict) that error messages name.
        model_type: the config's ``model_type``.
        config_class: the ``transformers`` config class whose defaults apply (for the notes).
        name: the name the spec gets.
        source: the file the config came from ("" for a dict).
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        *,
        where: str,
        model_type: str,
        config_class: str,
        name: str = "",
        source: str = "",
    ) -> None:
        self.data = data
        self.where = where
        self.model_type = model_type
        self.config_class = config_class
        self.name = name or model_type
        self.source = source
        self.notes: list[str] = []

    def _lookup(self, key: str, aliases: tuple[str, ...]) -> tuple[bool, Any, str]:
        present = [k for k in (key, *aliases) if k in self.data]
        values = {json.dumps(self.data[k], sort_keys=True, default=repr) for k in present}
        if len(values) > 1:
            found = ", ".join(f'"{k}": {self.data[k]!r}' for k in present)
            raise ConfigError(
                f"{self.where}: conflicting keys {found} (transformers reads them as one setting); "
                f"keep only one of them"
            )
        if present:
            return True, self.data[present[0]], present[0]
        return False, None, key

    def raw(self, key: str, default: Any = None) -> Any:
        """The key's value as parsed, unchecked (``default`` when absent)."""
        return self.data.get(key, default)

    def integer(
        self,
        key: str,
        *,
        absent: Any = REQUIRED,
        null: Any = REJECT,
        minimum: int = 1,
        aliases: tuple[str, ...] = (),
        note: bool = False,
    ) -> int:
        """Read an integer key.

        ``absent``: value when the key is missing (the transformers class default), or required.
        ``null``: value when the key is an explicit ``null``, or an error. ``note``: record in the
        spec's notes when ``absent`` was used (for defaults that shape weights).
        """
        found, value, used = self._lookup(key, aliases)
        if not found:
            if absent is REQUIRED:
                raise ConfigError(
                    f'{self.where}: required key "{key}" is missing (model_type "{self.model_type}"); '
                    f"add it, with the value from the model's published config.json"
                )
            if note and absent is not None:
                self.notes.append(f"{key} absent: {self.config_class} default {absent} used")
            return absent
        if value is None:
            if null is REJECT:
                raise ConfigError(
                    f'{self.where}: "{used}" is null; write an integer (model_type "{self.model_type}")'
                )
            return null
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{self.where}: "{used}" must be an integer, got {value!r}; write a JSON integer')
        if value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f'{self.where}: "{used}" must be {what}, got {value}; fix it in the config')
        if used in _COUNT_LIMITS:  # before any per-layer table is built
            check_limit(value, _COUNT_LIMITS[used], where=self.where, what=used)
        return value

    def flag(self, key: str, *, absent: bool, null: Any = REJECT) -> bool:
        """Read a boolean key (``absent``: the transformers class default)."""
        found, value, used = self._lookup(key, ())
        if not found:
            return absent
        if value is None:
            if null is REJECT:
                raise ConfigError(f'{self.where}: "{used}" is null; write true or false')
            return bool(null)
        if not isinstance(value, bool):
            raise ConfigError(f'{self.where}: "{used}" must be true or false, got {value!r}')
        return value

    def fraction(self, key: str, value: Any) -> float:
        """Check a factor in (0, 1] such as ``partial_rotary_factor``."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(f'{self.where}: "{key}" must be a number in (0, 1], got {value!r}')
        return float(value)


__all__ = ["REJECT", "REQUIRED", "ConfigReader"]
