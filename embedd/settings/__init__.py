"""The daemon's one typed settings object, built once at start-up.

Precedence, highest first: command-line flags > environment > TOML file >
defaults, merged by pydantic-settings from its own sources: the flags come in as
init values, the environment through its environment source, the file through
its TOML source. Each setting reads ``EMBEDD_<NAME>`` and nothing else but the
names of the system embedd replaces (``NAVIDROME_MILVUS_URI``,
``NAVIDROME_DB_PATH``, ``NAVIDROME_MUSIC_ROOT``, ``LOG_DIR``; see
:func:`env_names`), so another program's ``LOG_LEVEL`` or ``SOCKET`` never
becomes a setting.

This package re-exports what the rest of embedd uses; each concern is a module:

- :mod:`.model` -- the :class:`Settings` class: every setting's type, default,
  bounds, help text and checks, and what is derived from them;
- :mod:`.paths` -- the defaults of the socket and data directory (systemd, XDG);
- :mod:`.sources` -- each setting's environment names, the environment and TOML
  sources, and :class:`SettingsInvalid`;
- :mod:`.build` -- :func:`build_settings` (inputs to a Settings or one line of
  why not) and :func:`check_device`;
- :mod:`.cli` -- the argparse bridge: one ``embedd serve`` flag per setting.
"""

from __future__ import annotations

from embedd.settings.build import build_settings, check_device
from embedd.settings.cli import add_settings_arguments, settings_from_args
from embedd.settings.model import Settings, parse_windows, source_field
from embedd.settings.paths import default_socket_path
from embedd.settings.sources import SettingsInvalid, env_names

__all__ = [
    "Settings",
    "SettingsInvalid",
    "add_settings_arguments",
    "build_settings",
    "check_device",
    "default_socket_path",
    "env_names",
    "parse_windows",
    "settings_from_args",
    "source_field",
]
