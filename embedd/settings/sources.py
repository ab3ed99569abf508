"""Where a setting's value comes from besides the flags: its environment names and the TOML file.

Owns the mapping from a setting to the environment variables it reads
(:func:`env_names`: ``EMBEDD_<NAME>``, plus the names of the system embedd
replaces), the two pydantic-settings sources built on it (the environment, read
by those names only; the TOML config file, strict about what it holds), and the
context variable through which one ``build_settings`` call tells the TOML source
which file it was given: pydantic asks the settings class for its sources without
arguments. Kept apart from the settings model so that the model declares what
may be set and this module alone decides where it is read from.
"""

from __future__ import annotations

import contextlib
import contextvars
import tomllib
from pathlib import Path
from typing import Any, Iterator

from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

__all__ = ["ENV_PREFIX", "SettingsInvalid", "env_names", "reading_config_file", "settings_sources"]

ENV_PREFIX = "EMBEDD_"

# Settings whose environment names are not just ENV_PREFIX + NAME: the names of the
# system embedd replaces keep working after embedd's own, and one name is shorter.
_ENV_NAMES: dict[str, tuple[str, ...]] = {
    "log_dir": ("EMBEDD_LOG_DIR", "LOG_DIR"),
    "milvus_uri": ("EMBEDD_MILVUS_URI", "NAVIDROME_MILVUS_URI"),
    "navidrome_db": ("EMBEDD_NAVIDROME_DB", "NAVIDROME_DB_PATH"),
    "music_root": ("EMBEDD_MUSIC_ROOT", "NAVIDROME_MUSIC_ROOT"),
    "model_cache_dir": ("EMBEDD_MODEL_CACHE_DIR", "HF_HUB_CACHE"),
    "max_inflight_per_connection": ("EMBEDD_MAX_INFLIGHT",),
}


def env_names(field: str) -> tuple[str, ...]:
    """The environment variables a setting reads, first set one winning (names are case-sensitive)."""
    return _ENV_NAMES.get(field) or (ENV_PREFIX + field.upper(),)


class SettingsInvalid(Exception):
    """A setting could not be accepted; the message is one line for the operator."""


# pydantic asks the class for its sources without arguments; the file one build_settings
# call was told of reaches _TomlFile through this.
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("embedd_config_file", default=None)


@contextlib.contextmanager
def reading_config_file(path: Path | None) -> Iterator[None]:
    """Settings built inside this block read ``path`` (None: no file) as their TOML source."""
    chosen = _config_file.set(path)
    try:
        yield
    finally:
        _config_file.reset(chosen)


def settings_sources(
    settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource
) -> tuple[PydanticBaseSettingsSource, ...]:
    """Highest first: the flags build_settings passes in, the environment, the TOML
    file it was told of. No .env file and no secrets directory."""
    return (init_settings, _Environment(settings_cls), _TomlFile(settings_cls, _config_file.get()))


class _Environment(EnvSettingsSource):
    """pydantic's environment source, reading only each setting's documented names.

    The stock lookup also tries every alias, the bare field name (``batch_size``)
    included; here only :func:`env_names` count.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        for name in env_names(field_name):
            value = self.env_vars.get(name)
            if value is not None:
                return value, field_name, False
        return None, field_name, False


class _TomlFile(TomlConfigSettingsSource):
    """pydantic's TOML source, strict about the file it is given.

    A file that was named must be readable and valid TOML, and every key in it a
    setting: a typo fails start-up instead of being ignored. The keys may sit at
    the top level or in an ``[embedd]`` table.
    """

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        if path is not None:
            try:
                path.open("rb").close()
            except OSError as exc:
                raise SettingsInvalid(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
        self._known = frozenset(settings_cls.model_fields)  # the parent reads the file in its __init__
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except tomllib.TOMLDecodeError as exc:
            raise SettingsInvalid(f"config file {str(file_path)!r} is not valid TOML: {exc}") from None
        data = data.get("embedd", data)
        unknown = sorted(set(data) - self._known)
        if unknown:
            raise SettingsInvalid(f"config file {str(file_path)!r} has unknown setting {unknown[0]!r}")
        return data
