"""The docs stay honest: what README.md, docs/protocol.md and docs/operations.md
claim about settings, ops, error codes, frames, commands and messages is checked
against the code, and a few of the quoted messages against a real daemon.

Fast on purpose (no models are loaded): one daemon process for the module, a few
short-lived ``embedd`` processes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import pytest

from embedd.cli import build_parser
from embedd.errors import Code
from embedd.ops import SCHEMAS as OP_SCHEMAS
from embedd.settings import Settings, build_settings
from tests.daemon import Daemon, read_frame, send_frame, short_tmpdir

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
PROTOCOL = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
OPERATIONS = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")

# Settings whose default depends on the environment (the doc describes it in words).
_DYNAMIC_DEFAULTS = {"socket", "data_dir", "decode_workers", "memory_budget_mb"}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _settings_rows() -> dict[str, tuple[list[str], str]]:
    """flag -> (env names, default cell) from operations.md's generated table."""
    start = OPERATIONS.index("<!-- settings-table")
    end = OPERATIONS.index("<!-- /settings-table -->")
    rows = {}
    for line in OPERATIONS[start:end].splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        flag = cells[0].strip("`")
        envs = re.findall(r"`([^`]+)`", cells[1])
        assert flag not in rows, f"{flag} is listed twice"
        rows[flag] = (envs, cells[2])
    return rows


def _code_blocks(text: str, lang: str = "") -> list[str]:
    return re.findall(r"```" + lang + r"\n(.*?)```", text, flags=re.S)


def _after_marker(text: str, marker: str, lang: str) -> str:
    i = text.index(f"<!-- {marker} -->")
    m = re.compile(r"```" + lang + r"\n(.*?)```", re.S).search(text, i)
    assert m, marker
    return m.group(1)


def _hexdump_bytes(dump: str) -> bytes:
    out = bytearray()
    for line in dump.strip().splitlines():
        _, _, rest = line.partition("  ")
        hexpart = rest.split("|")[0]
        out += bytes.fromhex(hexpart.replace(" ", ""))
    return bytes(out)


def _embedd(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDD_", "NAVIDROME_", "LISTEN_", "NOTIFY_"))}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "embedd", *args], capture_output=True, text=True, timeout=timeout, env=clean, cwd=REPO
    )


def _doc_lines(text: str) -> set[str]:
    """Every line of every code block, stripped (the quoted outputs)."""
    return {line.strip() for block in _code_blocks(text, r"[a-z]*") for line in block.splitlines()}


# ---------------------------------------------------------------------------
# settings table
# ---------------------------------------------------------------------------


def test_settings_table_lists_exactly_the_settings_with_their_env_names_and_defaults():
    rows = _settings_rows()
    fields = Settings.model_fields
    assert set(rows) == {"--" + f.replace("_", "-") for f in fields}
    for field, info in fields.items():
        envs, default_cell = rows["--" + field.replace("_", "-")]
        assert envs == list(info.validation_alias.choices[1:]), field  # type: ignore[union-attr]
        assert default_cell, field
        if field in _DYNAMIC_DEFAULTS:
            continue
        default = info.get_default(call_default_factory=True)
        if field == "socket_mode":
            expected = f"{default:04o}"
        elif default is None or default == [] or default == {}:
            continue  # described in words ("none", "DATA_DIR/milvus.db", ...)
        else:
            expected = str(default)
        assert f"`{expected}`" in default_cell, f"{field}: doc says {default_cell!r}, code says {expected!r}"


def test_documented_env_file_and_toml_examples_are_valid_settings(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(("EMBEDD_", "NAVIDROME_")) or key in ("LOG_DIR", "HF_HUB_CACHE"):
            monkeypatch.delenv(key)
    env_block = re.search(r"<<'ENV'\n(.*?)\nENV", OPERATIONS, re.S).group(1)
    for line in env_block.splitlines():
        name, _, value = line.partition("=")
        monkeypatch.setenv(name, value)
    s = build_settings()
    assert s.navidrome_db == Path("/var/lib/navidrome/navidrome.db")
    assert s.music_root == Path("/srv/music") and s.idle_unload_s == 600
    for name in [line.partition("=")[0] for line in env_block.splitlines()]:
        monkeypatch.delenv(name)

    toml_text = _code_blocks(OPERATIONS, "toml")[0]
    path = tmp_path / "embedd.toml"
    path.write_text(toml_text)
    s = build_settings(config_file=path)
    assert s.preload == ["muq"] and s.idle_timeout_of("mert") == 60.0 and s.batch_size == 8


# ---------------------------------------------------------------------------
# protocol.md
# ---------------------------------------------------------------------------


def test_every_op_has_a_section_and_every_error_code_is_explained():
    """Every op is described in prose (section 6) today; a new op's exact reference is generated (section 9)."""
    headings = [line for line in PROTOCOL.splitlines() if line.startswith("### ")]
    for op in OP_SCHEMAS:
        assert any(re.search(rf"\b{op}\b", h) for h in headings), f"op {op} has no section in protocol.md"
        assert f"#### `{op}`" in PROTOCOL[PROTOCOL.index("## 9. Op reference") :], f"op {op} is not in the reference"
    error_table = PROTOCOL[PROTOCOL.index("## 7. Error codes") : PROTOCOL.index("## 8. Versions")]
    for code in Code:
        assert f"| `{code.value}` |" in error_table, f"error code {code.value} is not explained"


@pytest.mark.parametrize("name", ["ping-request", "ping-response"])
def test_hex_frames_decode_to_the_maps_shown(name):
    frame = _hexdump_bytes(_after_marker(PROTOCOL, f"frame: {name}", "text"))
    shown = json.loads(_after_marker(PROTOCOL, f"map: {name}", "json"))
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:], raw=False) == shown


def test_request_frame_is_what_embedd_frame_encodes():
    from embedd.protocol import encode_frame

    frame = _hexdump_bytes(_after_marker(PROTOCOL, "frame: ping-request", "text"))
    assert encode_frame({"id": 1, "op": "ping"}) == frame


def test_documented_examples_use_the_real_dimensions():
    from embedd.models import CATALOG

    for name, info in CATALOG.items():
        assert f'"{name}": {{"dim": {info.nominal_dim}, "windows": ' in PROTOCOL, name
        assert f"<bin {info.nominal_dim * 4} bytes = {info.nominal_dim} float32" in PROTOCOL


# ---------------------------------------------------------------------------
# README and command lines in the docs
# ---------------------------------------------------------------------------


def _subcommands(parser) -> set[str]:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def test_readme_keeps_the_two_setup_commands_and_the_layout():
    assert "    scripts/serve\n" in README and "    scripts/test\n" in README
    for script in ("serve", "test", "embedd-debug", "bootstrap"):
        assert os.access(REPO / "scripts" / script, os.X_OK), script
    for path in re.findall(r"^\| `([^`]+)`", README, flags=re.M):
        assert (REPO / path).exists(), f"README layout names {path}, which does not exist"


def test_readme_lists_every_cli_subcommand():
    parser = build_parser()
    listed = re.search(r"\(`ping`, .*?\)", README, re.S).group(0)
    for sub in _subcommands(parser) - {"serve"}:
        assert f"`{sub}" in listed, sub
    batch = parser._subparsers._group_actions[0].choices["batch"]  # type: ignore[union-attr]
    assert "start|progress|watch|pause|resume|cancel|failures" in listed.replace("\n", " ").replace("batch ", "")
    assert _subcommands(batch) == {"start", "progress", "watch", "pause", "resume", "cancel", "failures"}


def _documented_commands() -> list[list[str]]:
    commands = []
    for text in (README, OPERATIONS):
        for raw in re.findall(r"^\s*(?:\$ |sudo (?:-u \w+ )?)?(\S*\bembedd (?:ping|status|unload|embed|text|search|batch|drop-legacy|take-over)\b[^\n]*)", text, flags=re.M):
            if raw.startswith(("scripts/", "`")):
                continue
            argv = shlex.split(raw)
            commands.append(argv[1:])
    return commands


def test_commands_shown_in_the_docs_parse():
    commands = _documented_commands()
    assert len(commands) >= 8
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"documented command does not parse: embedd {' '.join(argv)}")


# ---------------------------------------------------------------------------
# quoted messages against the real program
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_daemon():
    """A daemon without a Navidrome database and with default limits; no model is ever loaded."""
    root = short_tmpdir("docs-")
    (root / "music").mkdir()
    d = Daemon(root, args=["--music-root", str(root / "music"), "--decode-workers", "1"])
    d.start()
    yield d
    d.stop()
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def _call(d: Daemon, message: dict) -> dict:
    with d.connect() as s:
        send_frame(s, message)
        return read_frame(s)


def _raw(d: Daemon, payload: bytes) -> dict:
    with d.connect() as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return read_frame(s)


def test_quoted_bad_frame_messages_are_what_the_daemon_sends(plain_daemon):
    table = PROTOCOL[PROTOCOL.index("### What is a bad frame") : PROTOCOL.index("## 3. Requests")]
    cases = {
        b"\x00\x00\x00\x00": "frame length 0 is outside 1..67108864 bytes",
        b"\xff\xff\xff\xff": "frame length 4294967295 is outside 1..67108864 bytes",
        struct.pack(">I", 5) + b"\xc1" * 5: "frame body is not one msgpack value (FormatError)",
        struct.pack(">I", 3) + b"\x92\x01\x02": "frame body is a msgpack list, not a map",
        struct.pack(">I", 4) + b"\x81\x01\xa1x": "frame map has a non-string key 1",
        struct.pack(">I", 100) + b"\x80": "connection closed in the middle of a frame (5 bytes)",
    }
    for payload, message in cases.items():
        assert f"`{message}`" in table
        answer = _raw(plain_daemon, payload)
        assert answer == {"id": None, "ok": False, "error": {"code": "bad_frame", "message": message}}


def test_quoted_request_errors_are_what_the_daemon_sends(plain_daemon):
    cases = [
        ({"id": 7, "op": "transcode"}, "unknown_op", "there is no op 'transcode'"),
        ({"id": 5, "op": "embed_file", "path": "/x.flac", "colour": "red"}, "bad_request", "embed_file: unknown argument 'colour'"),
        ({"id": 6, "op": "search", "model": "muq", "text": "x", "limit": 5000}, "bad_request", "search: argument 'limit': expected `int` <= 1000"),
        ({"id": 9, "op": "embed_file", "path": "/etc/passwd"}, "forbidden", "The path '/etc/passwd' lies outside the directories the daemon may read (ROOTS); add one with --allowed-roots or EMBEDD_ALLOWED_ROOTS."),
        ({"id": 10, "op": "embed_text", "text": "calm piano", "model": "mert"}, "unsupported", "model 'mert' cannot embed text; use 'muq'"),
        ({"id": 13, "op": "embed_file", "path": "relative.flac"}, "bad_request", "The path 'relative.flac' must be absolute."),
        ({"id": True, "op": "ping"}, "bad_request", "'id' must be an integer, a string of at most 256 characters, or nil"),
    ]
    for request, code, message in cases:
        answer = _call(plain_daemon, request)
        if "(ROOTS)" in message:  # the daemon names its own directories; the docs show an example
            answer["error"]["message"] = re.sub(r"read \(.*?\);", "read (ROOTS);", answer["error"]["message"])
        assert answer["ok"] is False and answer["error"] == {"code": code, "message": message}, answer
        quoted = re.sub(r"read \(.*?\);", "read (ROOTS);", PROTOCOL)
        assert message in quoted, f"protocol.md does not quote {message!r}"
    pong = _call(plain_daemon, {"id": 1, "op": "ping"})
    shown = json.loads(_after_marker(PROTOCOL, "map: ping-response", "json"))
    assert pong.keys() == shown.keys() and pong["result"].keys() == shown["result"].keys()
    assert pong["result"]["protocol"] == shown["result"]["protocol"] == 1


def test_batch_without_navidrome_db_message(plain_daemon):
    answer = _call(plain_daemon, {"id": 1, "op": "batch_start"})
    message = "no Navidrome database is configured; set NAVIDROME_DB_PATH (or --navidrome-db)"
    assert answer["error"] == {"code": "unavailable", "message": message}
    assert f"embedd: unavailable: {message}" in _doc_lines(OPERATIONS)


def test_second_daemon_refuses_with_the_documented_line(plain_daemon):
    result = _embedd("serve", "--socket", str(plain_daemon.socket), "--data-dir", str(plain_daemon.root / "other"))
    line = f"embedd: another embedd daemon is already serving on '{plain_daemon.socket}'"
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == line
    assert line.replace(str(plain_daemon.socket), "/run/embedd/embedd.sock") in _doc_lines(OPERATIONS)
    assert _call(plain_daemon, {"op": "ping"})["ok"]  # and the first one still serves


def test_invalid_setting_lines_are_what_serve_prints(tmp_path):
    documented = _doc_lines(OPERATIONS)
    for args, env in (
        (["--batch-size", "0"], {}),
        (["--device", "gpu"], {}),
        ([], {"EMBEDD_PRELOAD": "muq,clap"}),
    ):
        result = _embedd("serve", "--socket", str(tmp_path / "s.sock"), *args, env=env)
        assert result.returncode == 2
        assert result.stderr.strip() in documented, result.stderr
    toml = tmp_path / "embedd.toml"
    toml.write_text("batch_sise = 3\n")
    result = _embedd("serve", "--config", str(toml))
    assert result.returncode == 2
    assert result.stderr.strip().replace(str(toml), "/etc/embedd/embedd.toml") in documented


def test_a_cuda_device_this_host_cannot_use_is_refused_before_serving(tmp_path):
    """Like any bad setting: one line, exit status 2, no socket (cuda:64 exists on no host)."""
    sock = Path(short_tmpdir("docs-")) / "s.sock"
    result = _embedd("serve", "--socket", str(sock), "--data-dir", str(tmp_path), "--device", "cuda:64", timeout=120)
    line = result.stderr.strip()
    assert result.returncode == 2 and len(line.splitlines()) == 1, result.stderr
    assert line.startswith("embedd: invalid setting --device / EMBEDD_DEVICE: ")
    assert line.endswith("; use auto or cpu (got 'cuda:64')") and not sock.exists()
    if "Found no NVIDIA driver" in line:  # the documented host: no GPU at all
        assert line.replace("'cuda:64'", "'cuda'") in _doc_lines(OPERATIONS)


def test_unreachable_socket_messages(tmp_path):
    documented = _doc_lines(OPERATIONS)
    missing = "/run/embedd/embedd.sock"
    if not Path(missing).exists():
        result = _embedd("ping", "--socket", missing)
        assert result.returncode == 3
        assert result.stderr.strip() in documented
    stale = Path(short_tmpdir("docs-")) / "embedd.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    result = _embedd("ping", "--socket", str(stale))
    assert result.returncode != 0
    assert result.stderr.strip().replace(str(stale), missing) in documented


def test_unreadable_file_message(tmp_path):
    """The daemon's user may not read a file below an allowed root (run as nobody when we are root)."""
    root = Path(short_tmpdir("docs-"))
    os.chmod(root, 0o755)
    victim = root / "b.flac"
    victim.write_bytes(b"\0" * 64)
    os.chmod(victim, 0)
    code = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from embedd.audio import decode_file
        from embedd.errors import EmbeddError
        if os.geteuid() == 0:
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
        try:
            decode_file({str(victim)!r}, [(24000, 1)], roots=[Path({str(root)!r})])
        except EmbeddError as exc:
            print(exc.code.value + ": " + exc.message)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=REPO)
    out = result.stdout.strip()
    assert out == f"forbidden: The daemon has no permission to read '{victim}'.", result.stderr
    assert "embedd: " + out.replace(str(victim), "/srv/music/a/b.flac") in _doc_lines(OPERATIONS)


def test_quoted_runtime_messages_are_what_the_code_says(caplog):
    """The troubleshooting section's GPU out-of-memory, Milvus and queue messages, each one triggered."""
    import asyncio
    import logging
    import threading

    import torch

    from embedd.errors import EmbeddError
    from embedd.executor import Lane
    from embedd.models.runtime import run_batched
    from embedd.store import VectorStore

    documented = _doc_lines(OPERATIONS)

    def oom_above_one(items):
        if len(items) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return torch.zeros(len(items), 1)

    with caplog.at_level(logging.WARNING, logger="embedd.models.runtime"):
        assert len(run_batched(list(range(4)), oom_above_one, 4, model_name="mert")) == 4
    assert "model mert: CUDA out of memory, retrying with batch size 2" in caplog.messages
    assert "`model mert: CUDA out of memory, retrying with batch size 2`" in OPERATIONS  # quoted in prose

    def oom_always(items):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(EmbeddError) as oom:
        run_batched([0], oom_always, 1, model_name="mert")
    assert f"embedd: {oom.value.code.value}: {oom.value.message}" in documented

    with pytest.raises(EmbeddError) as down:
        VectorStore("http://127.0.0.1:9", timeout_s=2).ensure("muq", "embedding", 8)
    assert f"embedd: {down.value.code.value}: {down.value.message}" in documented

    async def overloaded() -> EmbeddError:
        from tests.test_executor import SPEC, RecordingModel, make_executor

        model = RecordingModel(SPEC)
        model.gate = threading.Event()  # the one running call holds the interactive lane
        ex = make_executor(model, limits={Lane.INTERACTIVE: 64, Lane.BATCH: 8})  # 64: the default, as quoted
        ex.start()
        try:
            running = asyncio.ensure_future(ex.embed_text(Lane.INTERACTIVE, "muq", "held"))
            while model.entered < 1:
                await asyncio.sleep(0.01)
            queued = [asyncio.ensure_future(ex.embed_text(Lane.INTERACTIVE, "muq", f"q{i}")) for i in range(64)]
            while ex.queue_depths["interactive"] < 64:
                await asyncio.sleep(0.01)
            with pytest.raises(EmbeddError) as full:
                await ex.embed_text(Lane.INTERACTIVE, "muq", "one too many")
            model.gate.set()
            await asyncio.gather(running, *queued)
            return full.value
        finally:
            model.gate.set()
            await ex.stop()

    full = asyncio.run(overloaded())
    assert f"embedd: {full.code.value}: {full.message}" in documented


def test_readme_tour_outputs_are_what_the_cli_prints(capsys):
    """Re-render the README's outputs with the CLI's own printers from the results they came from."""
    from embedd import __version__, cli

    def printed(fn, result) -> list[str]:
        fn(result)
        return capsys.readouterr().out.splitlines()

    def block_after(command: str) -> list[str]:
        lines = README.splitlines()
        i = next(n for n, line in enumerate(lines) if line.strip() == f"$ .venv/bin/embedd {command}")
        out = []
        for line in lines[i + 1 :]:
            if not line.startswith("    ") or line.strip().startswith("$ "):
                break
            out.append(line[4:])
        return out

    embed = {"duration_s": 20.0, "models": {
        "muq": {"dim": 1536, "windows": 1, "vector": bytes(1536 * 4)},
        "mert": {"dim": 76800, "windows": 1, "vector": bytes(76800 * 4)},
        "latent": {"dim": 576, "windows": 214, "vector": bytes(576 * 4)},
    }}
    assert printed(cli._print_embed, embed) == block_after(
        'embed "/tmp/dx/music/Aurora Lane/Night Drive/01 - Neon Rain.flac" -m muq -m mert -m latent')

    def hit(tid, score, artist, title):
        return {"track_id": tid, "score": score, "path": "", "title": title, "artist": artist, "album": ""}

    hits = {"hits": [
        hit("4a61fc98269eee415545b0a9fa63a81a", 0.15201503038406372, "Aurora Lane", "Neon Rain"),
        hit("fb98b56f7f443f1f86ab8e26e88ab195", 0.1490132212638855, "Kestrel", "Hollow Oak"),
        hit("d2f8f572d74c870c7c0d3815cf0ec266", 0.1482, "The Quiet Hours", "Paper Boats"),
    ]}
    assert printed(cli._print_hits, hits) == block_after('search "calm piano at night" -n 3')

    done = {"job_id": "149dc01cb850533f", "status": "completed_with_errors", "models": ["muq", "mert", "latent"],
            "total_tracks": 7, "processed_tracks": 6, "failed_tracks": 1, "skipped_tracks": 0, "current_track": None,
            "progress_percent": 100.0, "started_at": 1.0, "estimated_completion": None, "rate_tracks_per_s": None}
    running = {**done, "status": "running", "processed_tracks": 2, "failed_tracks": 0, "progress_percent": 28.6,
               "current_track": "Kestrel - Hollow Oak", "rate_tracks_per_s": 0.07}

    def lane(depth, oldest, in_flight):
        return {"depth": depth, "oldest_wait_s": oldest, "pass": in_flight, "yielding": False}

    def model(state, idle_s, dim, collection, text, running=()):
        return {"loaded": True, "state": state, "running": list(running), "pinned": True, "idle_s": idle_s,
                "dim": dim, "collection": collection, "text": text}

    status = {"version": __version__, "device": "cpu", "milvus": {"uri": "/tmp/dx/data/milvus.db", "ok": True},
              "queue": {"interactive": 0, "batch": 3}, "batch": running,
              "executor": {"lanes": {"interactive": lane(0, None, None),
                                     "batch": lane(3, 4.2, {"model": "latent", "items": 1, "age_s": 0.8})}},
              "models": {"muq": model("idle", 1.2, 1536, "embedding", True),
                         "mert": model("idle", 0.3, 76800, "mert_embedding", False),
                         "latent": model("running", None, 576, "latent_embedding", False, ["batch"])}}
    assert printed(cli._print_status, status) == block_after("status")
    assert cli.render_progress(done) == block_after("batch start --follow")[-1]
    assert block_after("ping") == [f"pong: embedd {__version__}, protocol 1, up 11 s"]
