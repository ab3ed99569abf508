"""The daemon's one typed settings object, built once at start-up.

Precedence, highest first: command-line flags > environment > TOML file >
defaults. The environment names of the system embedd replaces
(``NAVIDROME_MILVUS_URI``, ``NAVIDROME_DB_PATH``, ``NAVIDROME_MUSIC_ROOT``,
``LOG_DIR``) keep working beside embedd's own ``EMBEDD_*`` names. Every field's
description doubles as its ``embedd serve --help`` text, so the help can never
drift from what is accepted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from embedd.models import CATALOG, MODEL_NAMES

__all__ = ["Settings", "SettingsInvalid", "add_settings_arguments", "build_settings", "default_socket_path"]

MiB = 1024 * 1024


def _runtime_dir() -> Path:
    # systemd's RuntimeDirectory= wins; then the XDG user runtime dir; /run only for root.
    if d := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(d.split(":")[0])
    if d := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(d) / "embedd"
    if os.geteuid() == 0:
        return Path("/run/embedd")
    return Path(f"/tmp/embedd-{os.geteuid()}")


def _data_dir() -> Path:
    if d := os.environ.get("STATE_DIRECTORY"):
        return Path(d.split(":")[0])
    if d := os.environ.get("XDG_DATA_HOME"):
        return Path(d) / "embedd"
    if os.geteuid() == 0:
        return Path("/var/lib/embedd")
    return Path.home() / ".local" / "share" / "embedd"


def default_socket_path() -> Path:
    """Where client and daemon meet when neither is told otherwise."""
    return Path(os.environ.get("EMBEDD_SOCKET") or _runtime_dir() / "embedd.sock")


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything the daemon can be told. Frozen: built once, read everywhere."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        case_sensitive=False,
        validate_default=True,
    )

    # -- where things live ------------------------------------------------
    socket: Path = Field(
        default_factory=default_socket_path,
        validation_alias=_env("socket", "EMBEDD_SOCKET"),
        description="Unix socket path the daemon listens on.",
    )
    socket_mode: int = Field(
        default=0o660,
        validation_alias=_env("socket_mode", "EMBEDD_SOCKET_MODE"),
        description="Permission bits of the socket file, octal (e.g. 0660).",
    )
    data_dir: Path = Field(
        default_factory=_data_dir,
        validation_alias=_env("data_dir", "EMBEDD_DATA_DIR"),
        description="Directory for embedd's own state: Milvus Lite file, job state, upload spool.",
    )
    log_dir: Path | None = Field(
        default=None,
        validation_alias=_env("log_dir", "EMBEDD_LOG_DIR", "LOG_DIR"),
        description="Also write the log to LOG_DIR/embedd.log (default: stderr only, i.e. the journal).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        validation_alias=_env("log_level", "EMBEDD_LOG_LEVEL"),
        description="Log verbosity.",
    )

    # -- Navidrome and Milvus -----------------------------------------------
    milvus_uri: str | None = Field(
        default=None,
        validation_alias=_env("milvus_uri", "EMBEDD_MILVUS_URI", "NAVIDROME_MILVUS_URI"),
        description="Milvus Lite file path or Milvus server URI (http://host:19530); default DATA_DIR/milvus.db.",
    )
    navidrome_db: Path | None = Field(
        default=None,
        validation_alias=_env("navidrome_db", "EMBEDD_NAVIDROME_DB", "NAVIDROME_DB_PATH"),
        description="Navidrome's SQLite database (read-only), the library the batch job embeds.",
    )
    music_root: Path | None = Field(
        default=None,
        validation_alias=_env("music_root", "EMBEDD_MUSIC_ROOT", "NAVIDROME_MUSIC_ROOT"),
        description="Where this host sees the music library, when it differs from Navidrome's library path.",
    )
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        validation_alias=_env("allowed_roots", "EMBEDD_ALLOWED_ROOTS"),
        description="Extra directories embed_file may read, comma-separated (the music root is always allowed).",
    )

    # -- models and the executor ----------------------------------------------
    device: str = Field(
        default="auto",
        validation_alias=_env("device", "EMBEDD_DEVICE"),
        description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
    )
    muq_model: str = Field(
        default=CATALOG["muq"].default_source,
        validation_alias=_env("muq_model", "EMBEDD_MUQ_MODEL"),
        description="MuQ-MuLan weights: hub id or local directory.",
    )
    mert_model: str = Field(
        default=CATALOG["mert"].default_source,
        validation_alias=_env("mert_model", "EMBEDD_MERT_MODEL"),
        description="MERT weights: hub id or local directory.",
    )
    latent_model: str = Field(
        default=CATALOG["latent"].default_source,
        validation_alias=_env("latent_model", "EMBEDD_LATENT_MODEL"),
        description="Music2Latent checkpoint: hub id or local file.",
    )
    model_cache_dir: Path | None = Field(
        default=None,
        validation_alias=_env("model_cache_dir", "EMBEDD_MODEL_CACHE_DIR", "HF_HUB_CACHE"),
        description="Hugging Face hub cache to load hub ids from (default: the library's own).",
    )
    idle_unload_s: float = Field(
        default=360.0,
        gt=0,
        validation_alias=_env("idle_unload_s", "EMBEDD_IDLE_UNLOAD_S"),
        description="Unload a model after this many idle seconds.",
    )
    idle_unload_per_model: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        validation_alias=_env("idle_unload_per_model", "EMBEDD_IDLE_UNLOAD_PER_MODEL"),
        description="Per-model idle timeouts overriding idle_unload_s, e.g. mert=60,muq=900.",
    )
    idle_check_s: float = Field(
        default=5.0,
        gt=0,
        validation_alias=_env("idle_check_s", "EMBEDD_IDLE_CHECK_S"),
        description="How often the executor looks for idle models.",
    )
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=_env("preload", "EMBEDD_PRELOAD"),
        description="Models loaded at start and never unloaded by the idle timer, comma-separated.",
    )
    batch_size: int = Field(
        default=4,
        ge=1,
        le=1024,
        validation_alias=_env("batch_size", "EMBEDD_BATCH_SIZE"),
        description="Windows per forward pass (halved automatically on GPU out-of-memory).",
    )
    interactive_queue: int = Field(
        default=64,
        ge=1,
        validation_alias=_env("interactive_queue", "EMBEDD_INTERACTIVE_QUEUE"),
        description="Interactive requests that may wait for the executor before 'overloaded'.",
    )
    batch_queue: int = Field(
        default=8,
        ge=1,
        validation_alias=_env("batch_queue", "EMBEDD_BATCH_QUEUE"),
        description="Batch-job tracks that may wait for the executor.",
    )

    # -- audio -------------------------------------------------------------
    max_audio_s: float = Field(
        default=1800.0,
        gt=0,
        validation_alias=_env("max_audio_s", "EMBEDD_MAX_AUDIO_S"),
        description="Longest audio accepted, in seconds (too_large beyond).",
    )
    decode_workers: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1),
        ge=1,
        validation_alias=_env("decode_workers", "EMBEDD_DECODE_WORKERS"),
        description="Decoder worker processes.",
    )

    # -- the socket server ---------------------------------------------------
    max_frame: int = Field(
        default=64 * MiB,
        ge=1024,
        validation_alias=_env("max_frame", "EMBEDD_MAX_FRAME"),
        description="Largest frame accepted, in bytes.",
    )
    max_connections: int = Field(
        default=256,
        ge=1,
        validation_alias=_env("max_connections", "EMBEDD_MAX_CONNECTIONS"),
        description="Concurrent client connections; more are answered 'overloaded' and closed.",
    )
    max_inflight_per_connection: int = Field(
        default=256,
        ge=1,
        validation_alias=_env("max_inflight_per_connection", "EMBEDD_MAX_INFLIGHT"),
        description="Requests one connection may have in progress before the daemon stops reading it.",
    )
    idle_timeout_s: float = Field(
        default=600.0,
        gt=0,
        validation_alias=_env("idle_timeout_s", "EMBEDD_IDLE_TIMEOUT_S"),
        description="Close a connection that sent nothing and awaits nothing for this long.",
    )
    shutdown_timeout_s: float = Field(
        default=7.0,  # every stage shares it, so that SIGTERM to exit stays under 10 s
        gt=0,
        validation_alias=_env("shutdown_timeout_s", "EMBEDD_SHUTDOWN_TIMEOUT_S"),
        description="Grace for in-flight work at SIGTERM before it is cancelled.",
    )

    # -- the batch job -------------------------------------------------------
    checkpoint_every: int = Field(
        default=100,
        ge=1,
        validation_alias=_env("checkpoint_every", "EMBEDD_CHECKPOINT_EVERY"),
        description="Tracks between job checkpoints (written after Milvus confirmed them).",
    )
    batch_one_model_at_a_time: bool = Field(
        default=False,
        validation_alias=_env("batch_one_model_at_a_time", "EMBEDD_BATCH_ONE_MODEL_AT_A_TIME"),
        description="Run a batch job one model at a time (for GPUs too small to hold all three).",
    )
    milvus_retry_s: float = Field(
        default=600.0,
        gt=0,
        validation_alias=_env("milvus_retry_s", "EMBEDD_MILVUS_RETRY_S"),
        description="How long a batch job keeps retrying an unreachable Milvus before it fails.",
    )

    # -- validation -----------------------------------------------------------
    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ValueError(f"{value!r} is not an octal permission mode like 0660") from None
        return value

    @field_validator("allowed_roots", "preload", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("idle_unload_per_model", mode="before")
    @classmethod
    def _per_model(cls, value: Any) -> Any:
        if isinstance(value, str):
            pairs = {}
            for item in _split_list(value):
                name, sep, seconds = item.partition("=")
                if not sep:
                    raise ValueError(f"{item!r} is not NAME=SECONDS")
                pairs[name.strip()] = seconds.strip()
            return pairs
        return value

    @field_validator("preload")
    @classmethod
    def _known_models(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in CATALOG:
                raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
        return value

    @field_validator("idle_unload_per_model")
    @classmethod
    def _known_model_keys(cls, value: dict[str, float]) -> dict[str, float]:
        for name, seconds in value.items():
            if name not in CATALOG:
                raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
            if seconds <= 0:
                raise ValueError(f"idle timeout of {name!r} must be positive")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"{value!r} is not auto, cpu, cuda or cuda:N")

    @field_validator("socket", "data_dir", "log_dir", "navidrome_db", "music_root", "model_cache_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().absolute()

    @model_validator(mode="after")
    def _socket_fits(self) -> Settings:
        # sun_path holds 108 bytes on Linux; a longer path fails at bind() with a cryptic error.
        if len(os.fsencode(self.socket)) > 107:
            raise ValueError(f"socket path {str(self.socket)!r} is longer than the 107 bytes a Unix socket allows")
        return self

    # -- derived -----------------------------------------------------------------
    @property
    def resolved_milvus_uri(self) -> str:
        return self.milvus_uri or str(self.data_dir / "milvus.db")

    @property
    def state_db(self) -> Path:
        return self.data_dir / "state.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    def model_source(self, name: str) -> str:
        return {"muq": self.muq_model, "mert": self.mert_model, "latent": self.latent_model}[name]

    def idle_timeout_of(self, name: str) -> float:
        return self.idle_unload_per_model.get(name, self.idle_unload_s)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # build_settings merges command line, environment and file itself and passes the
        # result in: pydantic's own env source would also read bare field names
        # (LOG_LEVEL, SOCKET, ...) that belong to other programs.
        return (init_settings,)


class SettingsInvalid(Exception):
    """A setting could not be accepted; the message is one line for the operator."""


def _field_names(field: str) -> str:
    info = Settings.model_fields[field]
    aliases = [a for a in info.validation_alias.choices if a != field] if info.validation_alias else []  # type: ignore[union-attr]
    flag = "--" + field.replace("_", "-")
    return " / ".join([flag, *aliases])


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise SettingsInvalid(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsInvalid(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    data = data.get("embedd", data)  # allow a [embedd] table or top-level keys
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise SettingsInvalid(f"config file {str(path)!r} has unknown setting {unknown[0]!r}")
    return data


def _env_values() -> dict[str, str]:
    """Each setting's value from the first of its environment names that is set (and not empty)."""
    values = {}
    for field, info in Settings.model_fields.items():
        for name in info.validation_alias.choices[1:]:  # type: ignore[union-attr]
            if os.environ.get(name):
                values[field] = os.environ[name]
                break
    return values


def build_settings(cli: dict[str, Any] | None = None, config_file: Path | None = None) -> Settings:
    """CLI values > environment > TOML > defaults; raises SettingsInvalid with one line."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    if config_file is None and (env_file := os.environ.get("EMBEDD_CONFIG")):
        config_file = Path(env_file)
    file_values = _read_toml(config_file) if config_file else {}
    init = file_values | _env_values() | cli
    try:
        return Settings(**init)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "settings"
        where = _field_names(field) if field in Settings.model_fields else field
        value = err.get("input")
        shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
        reason = err["msg"].removeprefix("Value error, ")
        raise SettingsInvalid(f"invalid setting {where}: {reason}{shown}") from None
    except SettingsError as exc:
        raise SettingsInvalid(f"invalid settings: {exc}") from None


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, its help taken from the field description."""
    parser.add_argument("--config", type=Path, help="TOML file of settings (also EMBEDD_CONFIG).")
    for field, info in Settings.model_fields.items():
        flag = "--" + field.replace("_", "-")
        envs = [a for a in info.validation_alias.choices[1:]]  # type: ignore[union-attr]
        default = info.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(map(str, default)) or "none"
        elif isinstance(default, dict):
            default = ",".join(f"{k}={v}" for k, v in default.items()) or "none"
        elif field == "socket_mode":
            default = oct(default)
        help_text = f"{info.description} [env: {', '.join(envs)}; default: {default}]"
        if info.annotation is bool:
            parser.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=field, default=None, metavar=field.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    cli = {field: getattr(args, field, None) for field in Settings.model_fields}
    return build_settings(cli, getattr(args, "config", None))


def fail(message: str) -> None:
    print(f"embedd: {message}", file=sys.stderr)
    raise SystemExit(2)
