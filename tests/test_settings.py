"""Settings: one typed object, CLI > environment > TOML file > defaults."""

from __future__ import annotations

import argparse

import pytest
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
    assert s.batch_size == 4


def test_empty_environment_values_count_as_unset(monkeypatch):
    monkeypatch.setenv("NAVIDROME_MILVUS_URI", "")
    assert build_settings().milvus_uri is None
