"""The systemd units are valid for systemd itself and carry the hardening we promise."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def _parse(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read(UNITS / name)
    return parser


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: scripts/bootstrap --test installs the 'systemd' package"
    # verify insists that ExecStart exists: point it at this checkout's interpreter entry point.
    embedd_bin = Path(sys.executable).with_name("embedd")
    for name in ("embedd.service", "embedd.socket"):
        text = (UNITS / name).read_text().replace("/opt/embedd/.venv/bin/embedd", str(embedd_bin))
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [tool, "verify", str(tmp_path / "embedd.socket"), str(tmp_path / "embedd.service")],
        capture_output=True, text=True, timeout=60,
    )
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "embedd" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_service_is_notify_hardened_and_restarting():
    service = _parse("embedd.service")["Service"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert int(service["WatchdogSec"]) > 0
    assert service["User"] == "embedd"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
    }.items():
        assert service[key] == value, key
    assert "ProtectHome" in service
    assert "/var/lib/embedd" in service["ReadWritePaths"]
    assert "ReadOnlyPaths" in service
    assert "nvidia" in (UNITS / "embedd.service").read_text()  # GPU device access


def test_socket_unit_matches_the_service():
    socket_unit = _parse("embedd.socket")["Socket"]
    service_text = (UNITS / "embedd.service").read_text()
    assert socket_unit["ListenStream"] == "/run/embedd/embedd.sock"
    assert f"EMBEDD_SOCKET={socket_unit['ListenStream']}" in service_text
    assert socket_unit["SocketMode"] == "0660"
    assert socket_unit.get("Accept", "no") == "no"  # one daemon for all connections


@pytest.mark.parametrize("unit", ["embedd.service", "embedd.socket"])
def test_units_have_install_sections(unit):
    assert "WantedBy" in _parse(unit)["Install"]
