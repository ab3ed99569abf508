"""Settings: one typed object, CLI > environment > TOML file > defaults."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from embedd.settings import Settings, SettingsInvalid, add_settings_arguments, build_settings, settings_from_args


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("EMBEDD_", "NAVIDROME_")) or name in ("LOG_DIR", "HF_HUB_CACHE"):
            monkeypatch.delenv(name)


def test_defaults_follow_the_brief():
    s = build_settings()
    assert s.idle_unload_s == 360 and s.idle_check_s == 5
    assert s.max_frame == 64 * 1024 * 1024
    assert s.socket_mode == 0o660
    assert s.max_audio_s == 1800
    assert s.checkpoint_every == 100
    assert s.device == "auto"
    assert s.muq_model == "OpenMuQ/MuQ-MuLan-large" and s.mert_model == "m-a-p/MERT-v1-330M"
    assert s.resolved_milvus_uri == str(s.data_dir / "milvus.db")


def test_help_writes_the_defaults_as_the_docs_do():
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert "default: 0660]" in help_text and "0o" not in help_text
    assert "default: None" not in help_text and "LOG_DIR; default: none]" in help_text


def test_precedence_cli_over_env_over_file_over_default(tmp_path, monkeypatch):
    config = tmp_path / "embedd.toml"
    config.write_text('idle_unload_s = 10\nbatch_size = 3\nmax_connections = 7\ndevice = "cpu"\n')
    monkeypatch.setenv("EMBEDD_IDLE_UNLOAD_S", "20")
    monkeypatch.setenv("EMBEDD_BATCH_SIZE", "5")
    s = build_settings({"idle_unload_s": "30"}, config)
    assert s.idle_unload_s == 30  # CLI beats env and file
    assert s.batch_size == 5  # env beats file
    assert s.max_connections == 7  # file beats default
    assert s.device == "cpu"
    assert s.interactive_queue == 64  # default


def test_toml_file_from_env_and_embedd_table(tmp_path, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text("[embedd]\npreload = [\"muq\"]\n")
    monkeypatch.setenv("EMBEDD_CONFIG", str(config))
    assert build_settings().preload == ["muq"]


def test_original_environment_names_keep_working(monkeypatch, tmp_path):
    monkeypatch.setenv("NAVIDROME_MILVUS_URI", "http://milvus:19530")
    monkeypatch.setenv("NAVIDROME_DB_PATH", str(tmp_path / "navidrome.db"))
    monkeypatch.setenv("NAVIDROME_MUSIC_ROOT", "/srv/music")
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("EMBEDD_SOCKET", str(tmp_path / "e.sock"))
    monkeypatch.setenv("EMBEDD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EMBEDD_DEVICE", "cuda:1")
    monkeypatch.setenv("EMBEDD_MUQ_MODEL", "/models/muq")
    monkeypatch.setenv("EMBEDD_MERT_MODEL", "/models/mert")
    monkeypatch.setenv("EMBEDD_LATENT_MODEL", "/models/m2l.pt")
    s = build_settings()
    assert s.milvus_uri == "http://milvus:19530"
    assert s.navidrome_db == tmp_path / "navidrome.db"
    assert str(s.music_root) == "/srv/music"
    assert s.log_dir == tmp_path / "logs"
    assert s.socket == tmp_path / "e.sock" and s.data_dir == tmp_path / "data"
    assert s.device == "cuda:1"
    assert (s.muq_model, s.mert_model, s.latent_model) == ("/models/muq", "/models/mert", "/models/m2l.pt")


def test_lists_and_per_model_timeouts(monkeypatch):
    monkeypatch.setenv("EMBEDD_PRELOAD", "muq, latent")
    monkeypatch.setenv("EMBEDD_IDLE_UNLOAD_PER_MODEL", "mert=60,muq=900")
    s = build_settings()
    assert s.preload == ["muq", "latent"]
    assert s.idle_timeout_of("mert") == 60 and s.idle_timeout_of("muq") == 900 and s.idle_timeout_of("latent") == 360


@pytest.mark.parametrize(
    "cli, culprit",
    [
        ({"idle_unload_s": "soon"}, "--idle-unload-s"),
        ({"idle_unload_s": "-1"}, "--idle-unload-s"),
        ({"device": "tpu"}, "--device"),
        ({"preload": "muq,clap"}, "--preload"),
        ({"socket_mode": "rw"}, "--socket-mode"),
        ({"idle_unload_per_model": "mert"}, "--idle-unload-per-model"),
        ({"batch_size": "0"}, "--batch-size"),
        ({"socket": "/tmp/" + "x" * 120}, "socket"),
        ({"log_level": "loud"}, "--log-level"),
    ],
)
def test_invalid_settings_are_one_line_naming_the_setting(cli, culprit):
    with pytest.raises(SettingsInvalid) as info:
        build_settings(cli)
    message = str(info.value)
    assert culprit in message and "\n" not in message


def test_bad_config_files(tmp_path):
    with pytest.raises(SettingsInvalid, match="cannot be read"):
        build_settings(config_file=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("idle_unload_s = = 3")
    with pytest.raises(SettingsInvalid, match="not valid TOML"):
        build_settings(config_file=bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'red'")
    with pytest.raises(SettingsInvalid, match="colour"):
        build_settings(config_file=unknown)


def test_every_setting_has_a_flag_with_help():
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    help_text = parser.format_help()
    for field, info in Settings.model_fields.items():
        assert "--" + field.replace("_", "-") in help_text, field
        assert info.description, field
    args = parser.parse_args(["--batch-size", "9", "--batch-one-model-at-a-time"])
    s = settings_from_args(args)
    assert s.batch_size == 9 and s.batch_one_model_at_a_time is True


def test_settings_are_frozen():
    s = build_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.batch_size = 2  # type: ignore[misc]


def test_other_programs_variables_are_not_settings(monkeypatch, tmp_path):
    # LOG_LEVEL, SOCKET, DEVICE... belong to other programs: only the documented names count.
    monkeypatch.setenv("LOG_LEVEL", "INFO")
    monkeypatch.setenv("SOCKET", str(tmp_path / "other.sock"))
    monkeypatch.setenv("DEVICE", "tpu")
    monkeypatch.setenv("embedd_batch_size", "7")  # names are case-sensitive
    s = build_settings()
    assert s.log_level == "info" and s.socket != tmp_path / "other.sock" and s.device == "auto"
    assert s.batch_size == 32


def test_empty_environment_values_count_as_unset(monkeypatch):
    monkeypatch.setenv("NAVIDROME_MILVUS_URI", "")
    assert build_settings().milvus_uri is None


def test_quantize_is_off_by_default_and_flagged_in_model_id(monkeypatch):
    s = build_settings()
    assert s.quantize == "none" and s.model_id("muq") == "OpenMuQ/MuQ-MuLan-large"
    monkeypatch.setenv("EMBEDD_QUANTIZE", "int8")
    s = build_settings({"mert_hop_s": "15"})
    assert s.quantize == "int8"
    assert s.model_id("muq") == "OpenMuQ/MuQ-MuLan-large?int8"
    assert s.model_id("mert") == "m-a-p/MERT-v1-330M?hop_s=15&int8"
    with pytest.raises(SettingsInvalid, match="--quantize / EMBEDD_QUANTIZE"):
        build_settings({"quantize": "int4"})


def test_legacy_names_rank_as_environment_between_flags_and_file(tmp_path, monkeypatch):
    config = tmp_path / "embedd.toml"
    config.write_text(f'log_dir = "{tmp_path / "from-file"}"\nmilvus_uri = "http://file:19530"\n')
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("NAVIDROME_MILVUS_URI", "http://legacy:19530")
    s = build_settings(config_file=config)
    assert s.log_dir == tmp_path / "from-env" and s.milvus_uri == "http://legacy:19530"
    monkeypatch.setenv("EMBEDD_MILVUS_URI", "http://embedd:19530")  # embedd's own name beats the legacy one
    s = build_settings({"log_dir": str(tmp_path / "from-flag")}, config)
    assert s.log_dir == tmp_path / "from-flag" and s.milvus_uri == "http://embedd:19530"


def test_flags_and_file_take_field_names_only(tmp_path):
    config = tmp_path / "embedd.toml"
    config.write_text("EMBEDD_BATCH_SIZE = 3\n")
    with pytest.raises(SettingsInvalid, match="unknown setting 'EMBEDD_BATCH_SIZE'"):
        build_settings(config_file=config)


def test_the_error_names_the_flag_and_every_variable():
    with pytest.raises(SettingsInvalid) as info:
        build_settings({"max_inflight_per_connection": "0"})
    assert str(info.value).startswith("invalid setting --max-inflight-per-connection / EMBEDD_MAX_INFLIGHT: ")
    with pytest.raises(SettingsInvalid) as info:
        build_settings({"milvus_retry_s": "-1"})
    assert "--milvus-retry-s / EMBEDD_MILVUS_RETRY_S:" in str(info.value)


# Not settings, but read on purpose: the config file's name and what the path defaults follow.
_READ_FOR_DEFAULTS = {"EMBEDD_CONFIG", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR", "STATE_DIRECTORY", "XDG_DATA_HOME", "HOME"}


def _documented_names() -> set[str]:
    from embedd.settings import env_names

    return {name for field in Settings.model_fields for name in env_names(field)}


@given(
    name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True).filter(
        lambda n: n not in _documented_names() and n not in _READ_FOR_DEFAULTS
    ),
    field=st.sampled_from(sorted(Settings.model_fields)),
)
@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_only_documented_variable_names_are_read(name, field, monkeypatch):
    """Any other variable, however close to a setting's name, changes nothing."""
    baseline = build_settings()
    with monkeypatch.context() as patch:
        for candidate in {name, field, field.upper(), "EMBEDD_" + field, "embedd_" + field}:
            if candidate not in _documented_names():
                patch.setenv(candidate, "garbage")
        assert build_settings() == baseline


@given(
    flag=st.none() | st.integers(1, 1024),
    own=st.none() | st.integers(1, 1024),
    legacy=st.none() | st.sampled_from(["http://legacy:1", ""]),
    in_file=st.none() | st.integers(1, 1024),
)
@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_precedence_is_flag_then_environment_then_file_then_default(flag, own, legacy, in_file, monkeypatch, tmp_path):
    config = tmp_path / "embedd.toml"
    config.write_text(f'milvus_uri = "http://file:{in_file}"\n' + (f"batch_size = {in_file}\n" if in_file else ""))
    with monkeypatch.context() as patch:
        if own is not None:
            patch.setenv("EMBEDD_BATCH_SIZE", str(own))
            patch.setenv("EMBEDD_MILVUS_URI", f"http://own:{own}")
        if legacy is not None:
            patch.setenv("NAVIDROME_MILVUS_URI", legacy)
        cli = {"batch_size": None if flag is None else str(flag), "milvus_uri": None if flag is None else f"http://flag:{flag}"}
        s = build_settings(cli, config)
    assert s.batch_size == next(v for v in (flag, own, in_file, 32) if v is not None)
    expected_uri = (
        f"http://flag:{flag}" if flag is not None else f"http://own:{own}" if own is not None else legacy or f"http://file:{in_file}"
    )
    assert s.milvus_uri == expected_uri


def test_check_device_refuses_a_gpu_index_torch_does_not_have(monkeypatch):
    """On a host with one GPU, cuda:0 is accepted and cuda:1 refused, naming what there is."""
    import torch

    from embedd.settings import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device(build_settings({"device": "cuda:0"}))
    check_device(build_settings({"device": "cpu"}))
    with pytest.raises(SettingsInvalid) as err:
        check_device(build_settings({"device": "cuda:1"}))
    assert str(err.value) == (
        "invalid setting --device / EMBEDD_DEVICE: this host has 1 CUDA GPU (cuda:0); use auto or cpu (got 'cuda:1')"
    )


def test_latent_chunk_is_the_packages_60_s_by_default_and_flagged_when_smaller():
    s = build_settings()
    assert s.latent_chunk_s == 60.0 and s.chunk_override("latent") is None
    assert s.model_id("latent") == "SonyCSLParis/music2latent"
    s = build_settings({"latent_chunk_s": "10"})
    assert s.chunk_override("latent") == 10.0 and s.chunk_override("muq") is None
    assert s.model_id("latent") == "SonyCSLParis/music2latent?chunk_s=10"
    assert s.model_id("muq") == "OpenMuQ/MuQ-MuLan-large"
    with pytest.raises(SettingsInvalid, match="--latent-chunk-s / EMBEDD_LATENT_CHUNK_S"):
        build_settings({"latent_chunk_s": "2"})
