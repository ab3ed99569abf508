"""The settings model: every setting the daemon accepts, its type, default, bounds and help.

Owns the :class:`Settings` class (frozen, built once at start-up, read
everywhere), the checks on its values, and what it derives from them (the Milvus
URI, the state database, a model's id with its vector-changing knobs). Every
catalogued model gets a ``<name>_model`` source setting (``--muq-model``) from
:data:`embedd.models.CATALOG`. Every field's description doubles as its
``embedd serve --help`` text, so the help can never drift from what is accepted.
Where values come from is :mod:`embedd.settings.sources`; the defaults of the
paths are :mod:`embedd.settings.paths`; turning inputs into a Settings (or one
line saying why not) is :mod:`embedd.settings.build`.

Long because: every setting's declaration and help text.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

from pydantic import (
    AliasChoices,
    AliasGenerator,
    Field,
    SecretStr,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from embedd.address import HttpAddress, parse_http_address
from embedd.models import CATALOG
from embedd.settings.paths import data_dir as _data_dir
from embedd.settings.paths import default_socket_path
from embedd.settings.sources import env_names, settings_sources

__all__ = ["Settings", "parse_windows", "source_field"]

MiB = 1024 * 1024


def _names(field: str) -> AliasChoices:
    # The field name (TOML keys, flags) first, so every source hands values in under it.
    return AliasChoices(field, *env_names(field))


_WINDOW_RE = re.compile(r"\s*([01]?\d|2[0-3]):([0-5]\d)\s*-\s*([01]?\d|2[0-4]):([0-5]\d)\s*", re.ASCII)


def parse_windows(texts: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """``["01:00-07:00", "22:30-23:30"]`` -> minutes of the day ``((60, 420), (1350, 1410))``.

    A window may cross midnight (``22:00-06:00``); raises ValueError naming a bad one.
    """
    out = []
    for text in texts:
        m = _WINDOW_RE.fullmatch(text)
        if m is None:
            raise ValueError(f"{text!r} is not a time window like 01:00-07:00")
        start, end = int(m.group(1)) * 60 + int(m.group(2)), int(m.group(3)) * 60 + int(m.group(4))
        if end > 24 * 60 or start == end:
            raise ValueError(f"{text!r} is not a time window like 01:00-07:00")
        out.append((start, end))
    return tuple(out)


def source_field(model: str) -> str:
    """The setting naming a catalogued model's weights: ``muq`` -> ``muq_model``."""
    return f"{model}_model"


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _SettingsBase(BaseSettings):
    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        case_sensitive=True,
        env_ignore_empty=True,  # an empty variable counts as unset
        validate_default=True,
        alias_generator=AliasGenerator(validation_alias=_names),
    )


def _model_sources() -> dict[str, Any]:
    """One ``<name>_model`` field per catalogued model, defaulting to its official weights."""
    return {
        source_field(name): (
            str,
            Field(default=info.default_source, description=info.source_help or f"{name} weights: hub id or local path."),
        )
        for name, info in CATALOG.items()
    }


_WithModelSources = create_model("_WithModelSources", __base__=_SettingsBase, __module__=__name__, **_model_sources())


class Settings(_WithModelSources):  # type: ignore[valid-type,misc]
    """Everything the daemon can be told. Frozen: built once, read everywhere."""

    # -- where things live ------------------------------------------------
    socket: Path = Field(
        default_factory=default_socket_path,
        description="Unix socket path the daemon listens on.",
    )
    socket_mode: int = Field(
        default=0o660,
        description="Permission bits of the socket file, octal (e.g. 0660).",
    )
    data_dir: Path = Field(
        default_factory=_data_dir,
        description="Directory for embedd's own state: Milvus Lite file, job state, upload spool.",
    )
    log_dir: Path | None = Field(
        default=None,
        description="Also write the log to LOG_DIR/embedd.log (default: stderr only, i.e. the journal).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        description="Log verbosity.",
    )

    # -- Navidrome and Milvus -----------------------------------------------
    milvus_uri: str | None = Field(
        default=None,
        description="Milvus Lite file path or Milvus server URI (http://host:19530); default DATA_DIR/milvus.db.",
    )
    navidrome_db: Path | None = Field(
        default=None,
        description="Navidrome's SQLite database (read-only), the library the batch job embeds.",
    )
    music_root: Path | None = Field(
        default=None,
        description="Where this host sees the music library, when it differs from Navidrome's library path.",
    )
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Extra directories embed_file may read, comma-separated (the music root is always allowed).",
    )
    vector_cache_mb: int | None = Field(
        default=None,
        ge=0,
        description="Memory for the recommender's in-memory vector index, in MiB (0 = none: searches go to Milvus; "
        "default: 1/4 of the host's RAM, at most 8192). A model that does not fit is searched in Milvus.",
    )
    vector_graph_min_rows: int = Field(
        default=20_000,
        ge=0,
        description="Collections with at least this many tracks are searched through a navigation graph (HNSW): "
        "candidates found approximately, scored exactly, 5 to 10x faster at 100,000 tracks (0 = always exact).",
    )
    vector_cache_refresh_s: float = Field(
        default=900.0,
        ge=0,
        description="On a Milvus server, rebuild the in-memory vector index this often, for tracks written by "
        "other daemons (0 = never); the daemon's own writes are seen at once.",
    )

    # -- models and the executor ----------------------------------------------
    device: str = Field(
        default="auto",
        description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
    )
    model_cache_dir: Path | None = Field(
        default=None,
        description="Hugging Face hub cache to load hub ids from (default: the library's own).",
    )
    idle_unload_s: float = Field(
        default=360.0,
        gt=0,
        description="Unload a model after this many idle seconds.",
    )
    idle_unload_per_model: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict,
        description="Per-model idle timeouts overriding idle_unload_s, e.g. mert=60,muq=900.",
    )
    idle_check_s: float = Field(
        default=5.0,
        gt=0,
        description="How often the executor looks for idle models.",
    )
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models loaded at start and never unloaded by the idle timer, comma-separated.",
    )
    batch_size: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Most windows per forward pass; the memory budget usually allows fewer "
        "(halved automatically on GPU out-of-memory).",
    )
    memory_budget_mb: int | None = Field(
        default=None,
        ge=64,
        description="Memory for model activations in one forward pass, in MiB; every backend sizes "
        "its passes from it (default: 1/12 of the host's RAM on CPU, at most 8192; 1/4 of the GPU's).",
    )
    mert_hop_s: float = Field(
        default=5.0,
        ge=1.0,
        le=30.0,
        description="Seconds between MERT's 30 s windows. The contract's 5 s is the default; 15 s costs "
        "a third of the work but changes the vectors (rows are flagged in model_id; rebuild after changing it).",
    )
    latent_chunk_s: float = Field(
        default=60.0,
        ge=5.0,
        le=60.0,
        description="Seconds of audio per Music2Latent encoder pass. The package's (and the original system's) 60 s "
        "is the default; one 60 s pass needs about 7 GB at real size, 10 s about 1.2 GB, but the vectors differ "
        "(rows are flagged in model_id; rebuild after changing it).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Model arithmetic: auto = fp16 on CUDA, bf16 on CPUs with native bf16 "
        "(AVX-512 BF16 or AMX), fp32 elsewhere.",
    )
    compile: Literal["off", "auto", "on"] = Field(
        default="off",
        description="Compile each model's common forward pass with torch.compile, in the background on the "
        "batch lane, cached in <data_dir>/compile-cache: auto = the models measured faster on this kind of "
        "device (Music2Latent on a CPU on the system's malloc, none on tcmalloc or jemalloc; every model on "
        "CUDA), used only if no slower on this host; on = every "
        "model, always used; off (the default for now: see docs/operations.md) = never. Vectors are the same "
        "(cosine >= 0.9999).",
    )
    allocator: Literal["auto", "tcmalloc", "jemalloc", "system"] = Field(
        default="auto",
        description="The daemon's memory allocator: auto = tcmalloc, else jemalloc, where the host has one "
        "(Debian: libtcmalloc-minimal4), else the system's malloc. glibc's malloc gives each large activation "
        "back to the kernel and faults it in again: a Music2Latent pass on CPU took 2.4x as long on it.",
    )
    quantize: Literal["none", "int8"] = Field(
        default="none",
        description="int8 dynamic quantisation of Linear layers on CPU; changes vectors (flagged in model_id); "
        "off by default.",
    )
    interactive_queue: int = Field(
        default=64,
        ge=1,
        description="Interactive requests that may wait for the executor before 'overloaded'.",
    )
    batch_queue: int = Field(
        default=8,
        ge=1,
        description="Batch-job tracks that may wait for the executor.",
    )
    pass_budget_s: float = Field(
        default=1.0,
        ge=0,
        description="Most seconds one batch forward pass should take, from each model's measured rate "
        "(0 = sized by memory alone); the batch yields to interactive work between passes.",
    )
    batch_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads the batch job's model work may use (0 = every core the daemon may use).",
    )
    batch_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="How much lower the batch job's CPU priority is than interactive work and the rest "
        "of the host, as a Linux nice value (0 = the same).",
    )

    # -- the library job on a Ray cluster (embedd.cluster) -------------------
    ray_address: str | None = Field(
        default=None,
        description="Run the library job's model work on Ray workers: unset = in this process (the "
        "default); local = a Ray instance started for the daemon, one worker per local GPU; auto or "
        "host:port or ray://host:port = join that cluster. The daemon stays the one control plane "
        "(job state, checkpoints, Milvus writes). Needs embedd[ray]; see docs/operations.md.",
    )
    ray_workers_per_gpu: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Model workers per GPU of the Ray cluster (each holds the job's models).",
    )
    ray_cpu_workers: int = Field(
        default=0,
        ge=0,
        description="Model workers on CPUs of the Ray cluster, besides those on GPUs (for a cluster of "
        "CPU hosts); Ray spreads them over the nodes.",
    )
    ray_worker_cpus: float = Field(
        default=1.0,
        gt=0,
        description="CPUs a CPU model worker reserves on its node (Ray resource; its torch threads use "
        "them).",
    )
    ray_fallback: Literal["wait", "local"] = Field(
        default="wait",
        description="When the Ray cluster is unreachable: wait = the job waits (batch progress says why) "
        "and goes on when it is back; local = the job goes on in this process.",
    )
    ray_shared_paths: bool = Field(
        default=False,
        description="Ray workers see the music at the paths the daemon sees (a shared mount) and read "
        "the files themselves; otherwise the daemon reads each file once and ships its bytes.",
    )

    # -- audio -------------------------------------------------------------
    max_audio_s: float = Field(
        default=1800.0,
        gt=0,
        description="Longest audio accepted, in seconds (too_large beyond).",
    )
    decoded_audio_mb: int = Field(
        default=1024,
        ge=16,
        description="Decoded audio the daemon holds at once, in MiB; further decodes wait (a longer "
        "track still runs, alone).",
    )
    decode_workers: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1),
        ge=1,
        description="Decoder worker processes.",
    )

    # -- the socket server ---------------------------------------------------
    max_frame: int = Field(
        default=64 * MiB,
        ge=1024,
        description="Largest frame accepted, in bytes.",
    )
    max_connections: int = Field(
        default=256,
        ge=1,
        description="Concurrent client connections; more are answered 'overloaded' and closed.",
    )
    max_inflight_per_connection: int = Field(
        default=256,
        ge=1,
        description="Requests one connection may have in progress before the daemon stops reading it.",
    )
    # Admission (embedd.admission): socket and HTTP requests together.
    max_inflight_requests: int = Field(
        default=64,
        ge=1,
        description="Requests doing work (embed_file, embed_text, search, recommend) in progress at once, "
        "socket and HTTP together; more are answered 'overloaded' before any work is done.",
    )
    max_inflight_mb: int = Field(
        default=256,
        ge=1,
        description="Request data (embed_file uploads) the requests in progress may hold at once, in MiB; "
        "more is answered 'overloaded' (one larger request still runs alone).",
    )
    idle_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Close a connection that sent nothing and awaits nothing for this long.",
    )
    shutdown_timeout_s: float = Field(
        default=7.0,  # every stage shares it, so that SIGTERM to exit stays under 10 s
        gt=0,
        description="Grace for in-flight work at SIGTERM before it is cancelled.",
    )

    # -- the HTTP listener -------------------------------------------------
    http: str | None = Field(
        default=None,
        description="Also serve HTTP (health, metrics, REST and similarity APIs) on HOST:PORT, [IPv6]:PORT or unix:/path.",
    )
    http_token: SecretStr | None = Field(
        default=None,
        description="Bearer token every HTTP route but /healthz requires; needed when --http is not loopback.",
    )
    http_max_body: int = Field(
        default=64 * MiB,
        ge=1024,
        description="Largest HTTP request body accepted, in bytes.",
    )

    # -- the batch job -------------------------------------------------------
    checkpoint_every: int = Field(
        default=100,
        ge=1,
        description="Tracks between job checkpoints (written after Milvus confirmed them).",
    )
    batch_one_model_at_a_time: bool = Field(
        default=False,
        description="Run a batch job one model at a time (for GPUs too small to hold all three).",
    )
    milvus_retry_s: float = Field(
        default=600.0,
        gt=0,
        description="How long a batch job keeps retrying an unreachable Milvus before it fails.",
    )

    # -- the library watcher (embedd.batch.watch) --------------------------------
    watch: bool = Field(
        default=True,
        description="Watch Navidrome's database and embed added and changed tracks, and drop removed ones, "
        "by themselves (automatic jobs); --no-watch turns it off.",
    )
    watch_poll_s: float = Field(
        default=60.0,
        gt=0,
        description="Seconds between looks at Navidrome's database (a look reads one row per library).",
    )
    watch_quiet_s: float = Field(
        default=300.0,
        ge=0,
        description="An automatic job starts once the library has been quiet this long: no scan running, "
        "none finished and no new change seen.",
    )
    watch_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models automatic jobs keep current, comma-separated (default: those with vectors stored already).",
    )
    watch_hours: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Local time windows when automatic jobs may start, e.g. 01:00-07:00,13:00-14:00 (default: any time).",
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

    @field_validator("allowed_roots", "preload", "watch_models", "watch_hours", mode="before")
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

    @field_validator("watch_hours")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        parse_windows(value)
        return value

    @field_validator("preload", "watch_models")
    @classmethod
    def _known_models(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in CATALOG:
                raise ValueError(f"unknown model {name!r}; known: {', '.join(CATALOG)}")
        return value

    @field_validator("idle_unload_per_model")
    @classmethod
    def _known_model_keys(cls, value: dict[str, float]) -> dict[str, float]:
        for name, seconds in value.items():
            if name not in CATALOG:
                raise ValueError(f"unknown model {name!r}; known: {', '.join(CATALOG)}")
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

    @field_validator("http")
    @classmethod
    def _http_address(cls, value: str | None) -> str | None:
        return None if value is None else str(parse_http_address(value))

    @field_validator("http_token")
    @classmethod
    def _http_token_where_needed(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("the token is blank")
        address = info.data.get("http")
        if value is None and address is not None and not parse_http_address(address).loopback:
            raise ValueError(
                f"--http {address} is reachable from other hosts; set a token "
                "(every route but /healthz then requires 'Authorization: Bearer TOKEN')"
            )
        return value

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
    def http_address(self) -> HttpAddress | None:
        return parse_http_address(self.http) if self.http else None

    @property
    def state_db(self) -> Path:
        return self.data_dir / "state.sqlite3"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    def model_source(self, name: str) -> str:
        return getattr(self, source_field(name))

    def model_id(self, name: str) -> str:
        """What stored rows record as their model: the source, plus any knob that changes vectors.

        Vectors made with a non-default knob (``mert_hop_s``, ``latent_chunk_s``, ``quantize``) are
        flagged in their rows' ``model_id`` (``m-a-p/MERT-v1-330M?hop_s=15``,
        ``OpenMuQ/MuQ-MuLan-large?int8``, both: ``...?hop_s=15&int8``), so they are
        never mixed silently with the contract's vectors in one collection.
        """
        knobs = []
        if (hop := self.hop_override(name)) is not None:
            knobs.append(f"hop_s={hop:g}")
        if (chunk := self.chunk_override(name)) is not None:
            knobs.append(f"chunk_s={chunk:g}")
        if self.quantize != "none":
            knobs.append(self.quantize)
        source = self.model_source(name)
        return f"{source}?{'&'.join(knobs)}" if knobs else source

    def hop_override(self, name: str) -> float | None:
        """The window hop a model runs at instead of its contract's, or None (only MERT's is a knob)."""
        return self.mert_hop_s if name == "mert" and self.mert_hop_s != 5.0 else None

    def chunk_override(self, name: str) -> float | None:
        """Music2Latent's encoder chunk when not the package's 60 s, or None (a memory knob)."""
        return self.latent_chunk_s if name == "latent" and self.latent_chunk_s != 60.0 else None

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
        # Highest first: the flags build_settings passes in, the environment, the TOML
        # file it was told of. No .env file and no secrets directory.
        return settings_sources(settings_cls, init_settings)
