"""Building the Settings: flag values and a config file in, a valid Settings or one line out.

Owns :func:`build_settings` (which config file is read, ``EMBEDD_CONFIG``
included, and how pydantic's validation errors become one line naming the
setting by its flag and environment names) and :func:`check_device`, the one
check that needs the host rather than the values. Kept apart from the model so
the model stays declarations, and from the argparse bridge so callers without a
command line (tests, benchmarks) build settings the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from embedd.settings.model import Settings
from embedd.settings.sources import SettingsInvalid, env_names, reading_config_file

__all__ = ["build_settings", "check_device", "field_names"]


def field_names(field: str) -> str:
    """How an error names a setting: ``--batch-size / EMBEDD_BATCH_SIZE``."""
    flag = "--" + field.replace("_", "-")
    return " / ".join([flag, *env_names(field)])


def build_settings(cli: dict[str, Any] | None = None, config_file: Path | None = None) -> Settings:
    """CLI values > environment > TOML > defaults; raises SettingsInvalid with one line."""
    flags = {k: v for k, v in (cli or {}).items() if v is not None}
    if config_file is None and (env_file := os.environ.get("EMBEDD_CONFIG")):
        config_file = Path(env_file)
    with reading_config_file(config_file):
        try:
            return Settings(**flags)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "settings"
            where = field_names(field) if field in Settings.model_fields else field
            value = err.get("input")
            shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
            reason = err["msg"].removeprefix("Value error, ")
            raise SettingsInvalid(f"invalid setting {where}: {reason}{shown}") from None
        except SettingsError as exc:
            raise SettingsInvalid(f"invalid settings: {exc}") from None


def check_device(settings: Settings) -> None:
    """Refuse ``device = cuda`` / ``cuda:N`` that this host cannot run, before the daemon starts.

    Only an explicit CUDA device costs the torch import here (``auto`` and
    ``cpu`` never fail this way); without the check the daemon would start and
    every model request would fail. Raises :class:`SettingsInvalid` with one line.
    """
    device = settings.device
    if not device.startswith("cuda"):
        return
    import torch

    index = int(device[5:]) if device.startswith("cuda:") else 0
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if index < count:
            return
        have = ", ".join(f"cuda:{i}" for i in range(count))
        reason = f"this host has {count} CUDA GPU{'s' if count != 1 else ''} ({have})"
    elif torch.version.cuda is None:
        reason = f"this torch build ({torch.__version__}) has no CUDA support"
    else:
        try:  # is_available() only says no; initialising says why (it fails: nothing is set up)
            torch.cuda.init()
            why = "torch sees none"
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0].rstrip(".")
        reason = f"no usable CUDA GPU ({why})"
    raise SettingsInvalid(f"invalid setting {field_names('device')}: {reason}; use auto or cpu (got {device!r})")
