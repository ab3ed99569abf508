"""The argparse bridge: one ``embedd serve`` flag per setting, and Settings from parsed flags.

Owns how a setting appears on the command line: its flag (``--batch-size``;
``--watch`` / ``--no-watch`` for a yes/no one), its help (the field's
description plus its environment names and default, as ``embedd serve --help``
shows them), and the order of the flags (declaration order, the models' sources
right after ``device``). The flags are a thin argparse layer rather than
pydantic's own CLI source, which would print its own help format and could not
share the ``serve`` subcommand's parser as it is. Every flag defaults to None, so
an absent flag leaves the environment, file and default to decide.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embedd.models import CATALOG
from embedd.settings.build import build_settings
from embedd.settings.model import Settings, source_field
from embedd.settings.sources import env_names

__all__ = ["add_settings_arguments", "settings_from_args"]


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, its help taken from the field description."""
    parser.add_argument("--config", type=Path, help="TOML file of settings (also EMBEDD_CONFIG).")
    for field in _flag_order():
        info = Settings.model_fields[field]
        flag = "--" + field.replace("_", "-")
        envs = env_names(field)
        default = info.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(map(str, default)) or "none"
        elif isinstance(default, dict):
            default = ",".join(f"{k}={v}" for k, v in default.items()) or "none"
        elif default is None:
            default = "none"
        elif field == "socket_mode":
            default = f"{default:04o}"  # as chmod and the docs write it: 0660, not 0o660
        help_text = f"{info.description} [env: {', '.join(envs)}; default: {default}]"
        if info.annotation is bool:
            parser.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=field, default=None, metavar=field.upper(), help=help_text)


def _flag_order() -> list[str]:
    """The settings in declaration order, the models' sources right after ``device``."""
    sources = [source_field(name) for name in CATALOG]
    order = [field for field in Settings.model_fields if field not in sources]
    at = order.index("device") + 1
    return order[:at] + sources + order[at:]


def settings_from_args(args: argparse.Namespace) -> Settings:
    cli = {field: getattr(args, field, None) for field in Settings.model_fields}
    return build_settings(cli, getattr(args, "config", None))


def fail(message: str) -> None:
    """Print ``embedd: MESSAGE`` to stderr and exit 2, as argparse does for a bad flag."""
    print(f"embedd: {message}", file=sys.stderr)
    raise SystemExit(2)
