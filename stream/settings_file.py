"""The optional settings file named by PROFILESTREAM_SETTINGS_FILE: a .env file or a TOML file."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from handlers.errors import ConfigError

FILE_FIELD = "settings_file"


class SettingsFileSource(PydanticBaseSettingsSource):
    """Settings read from the file that `settings_file` names, as an argument or an environment variable.

    A file whose name ends in .toml contains setting names without the prefix, in lower case
    (`kafka_bootstrap_servers = "..."`). Any other file is a .env file of prefixed lines
    (`PROFILESTREAM_KAFKA_BOOTSTRAP_SERVERS=...`). Raises ConfigError when the file is
    missing, cannot be parsed or names an unknown setting.
    """

    def __init__(self, settings_cls: type[BaseSettings], init_kwargs: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.prefix = settings_cls.model_config.get("env_prefix", "")
        self.variable = f"{self.prefix}{FILE_FIELD.upper()}"
        if FILE_FIELD in init_kwargs:
            self.path = init_kwargs[FILE_FIELD]
        else:
            self.path = os.environ.get(self.variable)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Unused: __call__ returns every value of the file at once.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self.path:
            return {}
        path = Path(self.path)
        if not path.is_file():
            raise ConfigError(f"{self.variable}={path}: file not found; create it or point {self.variable} to an existing .env or .toml file")
        known = set(self.settings_cls.model_fields) - {FILE_FIELD}
        if path.suffix == ".toml":
            values = self._read_toml(path)
            unknown = [name for name in values if name not in known]
        else:
            values, unknown = self._read_dotenv(path, known)
        if unknown:
            raise ConfigError(
                f"unknown setting {', '.join(sorted(unknown))} in {path} ({self.variable});"
                " check the spelling against the README's configuration table"
            )
        return values

    def _read_toml(self, path: Path) -> dict[str, Any]:
        try:
            with path.open("rb") as file:
                return tomllib.load(file)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"invalid TOML in {path} ({self.variable}): {error}; fix the file") from None

    def _read_dotenv(self, path: Path, known: set[str]) -> tuple[dict[str, Any], list[str]]:
        """Return the values by setting name, and the variables of the file that name no setting."""
        values = {}
        unknown = []
        for name, value in dotenv_values(path, encoding="utf-8").items():
            key = name[len(self.prefix):].lower() if name.startswith(self.prefix) else None
            if key not in known:
                unknown.append(name)
            elif value is not None:
                values[key] = value
        return values, unknown
