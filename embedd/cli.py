"""The ``embedd`` command line: ``serve`` runs the daemon, the rest talk to it.

Client subcommands print something a person can read, or the raw result with
``--json`` for scripts, and exit non-zero with the daemon's own sentence when
it answers an error (exit 1), or when it cannot be reached (exit 3). Following
a batch job exits 0 when it finished (``completed`` or ``completed_with_errors``)
and 1 when it ``failed`` or was ``cancelled``.

Long because: every subcommand's arguments and its printer; each printer is a few lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.handlers
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from embedd import __version__
from embedd.errors import Code, EmbeddError
from embedd.models import DEFAULT_JOB_MODELS, MODEL_NAMES
from embedd.protocol import DEFAULT_MODEL
from embedd.settings import (
    SettingsInvalid,
    add_settings_arguments,
    check_device,
    default_socket_path,
    settings_from_args,
)

if TYPE_CHECKING:
    from embedd.client import Client

__all__ = ["main"]

# ---------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------


def _configure_logging(level: str, log_dir: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(log_dir / "embedd.log", maxBytes=10 * 2**20, backupCount=3)
        )
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    # Libraries that narrate their own start-up at INFO (faiss inside Milvus Lite).
    for chatty in ("faiss", "faiss.loader"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # pymilvus logs every refused call with a traceback, including the ones the store
    # expects and handles (a server refusing MERT's width, reconnects while Milvus is
    # down); Milvus Lite's in-process gRPC server logs each call it does not implement.
    # The store turns real failures into contract errors that we log ourselves.
    # pymilvus configures its own logger when imported, so import it first.
    import pymilvus  # noqa: F401

    for noisy in ("pymilvus", "pymilvus.milvus_client", "grpc"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    # muq 0.1.0 loads its text tower with XLMRobertaModel.from_pretrained(trust_remote_code=True);
    # transformers warns at every MuQ-MuLan load that the flag has no effect there. Only that
    # notice is dropped: the same logger's other warnings (missing weights...) still count.
    logging.getLogger("transformers.modeling_utils").addFilter(_not_the_trust_remote_code_notice)
    # The daemon writes nothing to stdout; libraries do (huggingface_hub prints "Loading
    # weights from local directory" at every MuQ-MuLan load). Their lines go to the log at
    # DEBUG instead of the journal; process-wide, as swapping stdout around one call from
    # the model threads would not be thread-safe.
    sys.stdout = _LogStream(logging.getLogger("embedd.stdout"), logging.DEBUG)


def _not_the_trust_remote_code_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("The argument `trust_remote_code` is to be used with Auto classes")


class _LogStream:
    """A text stream whose lines become log records (the serving daemon's ``sys.stdout``)."""

    encoding = "utf-8"

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self._logger = logger
        self._level = level

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._logger.log(self._level, "%s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        check_device(settings)
    except SettingsInvalid as exc:
        print(f"embedd: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level, settings.log_dir)

    import uvloop

    from embedd.server import Server, StartupError

    try:
        uvloop.run(Server(settings).serve())
    except StartupError as exc:
        print(f"embedd: {exc}", file=sys.stderr)
        return 1
    # Shutdown is complete: the job is checkpointed, the socket removed. Exit now
    # rather than let the interpreter join threads still inside torch or a Milvus
    # call (a forward pass cut short at finalisation aborts the process).
    # os._exit skips the interpreter's exit hooks, multiprocessing's among them: the
    # decoder pool's named semaphores (its queues' locks) would stay registered, and
    # multiprocessing's resource tracker would unlink them and warn "There appear to be
    # 5 leaked semaphore objects" at every stop. Run the finalizers that hook runs first.
    import multiprocessing.util

    multiprocessing.util._run_finalizers(0)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------
# client commands
# ---------------------------------------------------------------------------


def _fmt_vector(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<{len(value) // 4} float32>"
    if isinstance(value, list):
        return f"<{len(value)} floats>"
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        import numpy as np

        if len(value) % 4 == 0:
            return np.frombuffer(value, dtype="<f4").tolist()
        return value.hex()
    raise TypeError(type(value).__name__)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def render_progress(p: dict) -> str:
    total = p.get("total_tracks") or 0
    done = p.get("processed_tracks") or 0
    width = 30
    filled = int(width * (p.get("progress_percent") or 0) / 100)
    bar = "#" * filled + "-" * (width - filled)
    line = (
        f"[{bar}] {p.get('progress_percent', 0):5.1f}% {done}/{total} "
        f"failed {p.get('failed_tracks', 0)} skipped {p.get('skipped_tracks', 0)} "
    )
    if p.get("status") == "running":  # a rate and an ETA only while tracks are being worked on
        rate = p.get("rate_tracks_per_s")
        eta = p.get("estimated_completion")
        line += f"{rate:.2f} tracks/s " if rate is not None else "? tracks/s "
        line += f"ETA {_duration(eta - time.time()) if eta else '?'} "
    line += str(p.get("status"))
    if p.get("current_track"):
        line += f" | {p['current_track']}"
    return line


def _print_status(r: dict) -> None:
    print(f"embedd {r['version']} on {r['device']}")
    print(f"milvus: {r['milvus']['uri']} ({'ok' if r['milvus']['ok'] else 'unreachable'})")
    lanes = (r.get("executor") or {}).get("lanes")
    if lanes:
        for lane, v in lanes.items():
            print(f"{'lane ' + lane + ':':<17} {_lane_line(v)}")
    else:
        print(f"queues: interactive {r['queue']['interactive']}, batch {r['queue']['batch']}")
    io = [f"{name} " + ", ".join(f"{lane} {v.get('depth', 0)}" for lane, v in lanes_of.items())
          for name, lanes_of in (("decoder", r.get("decoder")), ("store", r.get("store"))) if lanes_of]
    admission = r.get("admission")
    if admission:
        io.append(f"admitted {admission['in_flight']}/{admission['limit']}")
    if io:
        print("waiting:          " + "; ".join(io))
    print("models:")
    for name, m in r["models"].items():
        text = ", text" if m["text"] else ""
        print(f"  {name:<7} {_model_state(m):<24} dim {m['dim']:<6} -> {m['collection']}{text}")
        if m.get("error"):  # the last load attempt failed (the docs promise it here)
            print(f"          error: {m['error']}")
    batch = r.get("batch")
    if batch and batch.get("job_id"):
        print("batch: " + render_progress(batch))
    else:
        print("batch: no job has run")
    watch = r.get("library_watch")
    if watch:
        print("library: " + _watch_line(watch))
    for c in r.get("legacy_collections") or []:
        where = "still serves its public name" if c["serving"] else "kept; embedd drop-legacy removes it"
        print(f"legacy: {c['collection']} ({c['model']}, {_rows(c['rows'])}): {where}")


def _model_state(m: dict) -> str:
    state = m.get("state") or ("idle" if m["loaded"] else "unloaded")
    if state == "running":
        text = f"running ({', '.join(m.get('running') or [])})"
    elif state == "idle":
        text = f"loaded, idle {m['idle_s']:.0f}s" if m.get("idle_s") is not None else "loaded"
    else:
        text = {"unloaded": "not loaded", "loading": "loading"}.get(state, state)
    return text + (", in job" if m.get("pinned") else "")


def _lane_line(v: dict) -> str:
    """One lane: its queue, its oldest wait and the forward pass in flight."""
    line = f"{v['depth']} waiting"
    if v.get("oldest_wait_s") is not None:
        line += f" (oldest {v['oldest_wait_s']:.1f}s)"
    current = v.get("pass")
    if current:
        line += f", pass {current['model']} x{current['items']}"
        if current.get("age_s") is not None:
            line += f" for {current['age_s']:.1f}s"
    elif v.get("yielding"):
        line += ", yielding to interactive work"
    else:
        line += ", idle"
    return line


def _watch_line(w: dict) -> str:
    """The library watcher: what is pending and why no automatic job runs yet."""
    if not w.get("enabled"):
        return "not watched (watch = false)"
    pending = w.get("pending") or {}
    line = ", ".join(f"{n} {kind}" for kind, n in sorted(pending.items()) if n) or "current"
    if w.get("scan_in_progress"):
        line += "; Navidrome is scanning"
    if w.get("next_job_at") and sum(pending.values()):
        line += f"; next automatic job in {max(0.0, w['next_job_at'] - time.time()):.0f}s"
    if w.get("waiting"):
        line += f" (waiting: {w['waiting'].replace('_', ' ')})"
    if w.get("error"):
        line += f"; error: {w['error']}"
    return line


def _rows(n: int | None) -> str:
    return "? rows" if n is None else f"{n} rows"


def _print_drop_legacy(r: dict) -> None:
    found = r["collections"]
    if not found:
        print("no legacy collection to drop")
        return
    verb = "dropped" if r["dropped"] else "would drop"
    for c in found:
        print(f"{verb} {c['collection']} ({c['model']}, {_rows(c['rows'])})")
    if not r["dropped"]:
        print("run again with --yes to drop them")


def _print_take_over(r: dict) -> None:
    verb = "would adopt" if r["dry_run"] else "adopted"
    for model, m in r["models"].items():
        if not m["collections"]:
            print(f"{model}: no collection of the original system")
            continue
        if m.get("refused"):
            print(f"{model}: refused: {m['refused']}")
            continue
        print(f"{model}: {m['rows']} rows in {', '.join(m['collections'])}: {verb} {m['adopted']}, "
              f"already stored {m['already_stored']}, unresolved {m['unresolved']}, ambiguous {m['ambiguous']}")
        for model_id, n in m["other_model_id"].items():
            print(f"  {n} rows of another model ({model_id!r}) left alone")
        if m["other_dim"]:
            print(f"  {m['other_dim']} rows of another width left alone")
        for name in m["unresolved_names"]:
            print(f"  no track named {name!r}")
        for a in m["ambiguous_names"]:
            print(f"  {len(a['tracks'])} tracks named {a['name']!r}: not adopted ({', '.join(a['tracks'])})")
    if not r["dry_run"]:
        print("the next incremental job (embedd batch start) embeds only what was not adopted")


def _print_hits(r: dict) -> None:
    hits = r["hits"]
    if not hits:
        print("no results")
        return
    for rank, hit in enumerate(hits, 1):
        who = " - ".join(x for x in (hit.get("artist"), hit.get("title")) if x) or hit.get("path") or hit["track_id"]
        print(f"{rank:>3}. {hit['score']:.4f}  {who}  [{hit['track_id']}]")


def _print_mix(r: dict) -> None:
    for warning in r["warnings"]:
        print(f"warning: {warning}")
    if not r["tracks"]:
        print("no results")
    for rank, t in enumerate(r["tracks"], 1):
        who = " - ".join(x for x in (t.get("artist"), t.get("title")) if x) or t.get("path") or t["track_id"]
        print(f"{rank:>3}. {t['score']:.4f}  {who}  [{t['track_id']}]  {t['reason']} ({','.join(t['models'])})")


async def _mix_args(client: Client, args: argparse.Namespace) -> dict:
    """``embedd mix``'s options as ``recommend`` arguments (a file is embedded first, by each model)."""
    models = args.models or [DEFAULT_MODEL]
    seeds: list[dict] = [{"track_id": tid, "source": "track"} for tid in args.track_ids or []]
    seeds += [{"text": text, "source": "text"} for text in args.texts or []]
    for path in args.files or []:
        r = await client.call("embed_file", path=str(Path(path).absolute()), models=models)
        seeds.append({"embeddings": {m: v["vector"] for m, v in r["models"].items()}, "source": "file"})
    call_args: dict = {"seeds": seeds, "models": models, "limit": args.limit, "diversity": args.diversity}
    for key, value in (
        ("exclude_track_ids", args.exclude), ("negative_prompts", args.negative), ("library_ids", args.library),
        ("disliked_artist_ids", args.dislike_artist), ("merge_strategy", args.merge),
        ("min_model_agreement", args.min_agreement),
    ):  # fmt: skip
        if value:
            call_args[key] = value
    return call_args


def _print_embed(r: dict) -> None:
    print(f"duration {r['duration_s']:.1f} s")
    for name, m in r["models"].items():
        print(f"  {name:<7} dim {m['dim']:<6} windows {m['windows']:<4} vector {_fmt_vector(m['vector'])}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _print_failures(r: dict) -> None:
    # The progress counts failed tracks; a track fails once per model it failed for.
    tracks = r.get("tracks", r["total"])
    print(f"{_plural(tracks, 'failed track')}, {_plural(r['total'], 'failure')} (one per track and model)")
    for f in r["failures"]:
        print(f"  {f['code']:<13} {f['model']:<7} {f['path'] or f['track_id']}: {f['message']}")


async def _run_client(args: argparse.Namespace) -> int:
    from embedd.client import Client

    as_json: bool = args.json
    async with await Client.connect(args.socket) as client:

        def out(result: dict, human: Callable[[dict], None]) -> None:
            if as_json:
                print(json.dumps(result, default=_json_default))
            else:
                human(result)

        cmd = args.command
        if cmd == "ping":
            r = await client.call("ping")
            out(r, lambda r: print(f"pong: embedd {r['version']}, protocol {r['protocol']}, up {r['uptime_s']:.0f} s"))
        elif cmd == "status":
            out(await client.call("status"), _print_status)
        elif cmd == "unload":
            call_args = {"model": args.model} if args.model else {}
            out(await client.call("unload", **call_args), lambda r: print("unloaded: " + (", ".join(r["unloaded"]) or "nothing")))
        elif cmd == "embed":
            call_args = {"path": str(Path(args.file).absolute()), "models": args.models or [DEFAULT_MODEL], "store": args.store}
            if args.track_id:
                call_args["track_id"] = args.track_id
            out(await client.call("embed_file", **call_args), _print_embed)
        elif cmd == "text":
            r = await client.call("embed_text", text=args.text, model=args.model)
            out(r, lambda r: print(f"{r['model']}: dim {r['dim']} vector {_fmt_vector(r['vector'])} raw {_fmt_vector(r['raw'])}"))
        elif cmd == "search":
            call_args = {"model": args.model, "limit": args.limit}
            if args.text:
                call_args["text"] = args.text
            elif args.track_id:
                call_args["track_id"] = args.track_id
            if args.exclude:
                call_args["exclude_track_ids"] = args.exclude
            out(await client.call("search", **call_args), _print_hits)
        elif cmd == "mix":
            if not (args.track_ids or args.texts or args.files):
                raise EmbeddError(Code.BAD_REQUEST, "mix: give at least one --track-id, --text or --file")
            out(await client.call("recommend", **await _mix_args(client, args)), _print_mix)
        elif cmd == "batch":
            return await _run_batch(client, args, out)
        elif cmd == "drop-legacy":
            call_args = {"confirm": args.yes, **({"model": args.model} if args.model else {})}
            out(await client.call("drop_legacy", **call_args), _print_drop_legacy)
        elif cmd == "take-over":
            call_args = {"dry_run": args.dry_run, **({"model": args.model} if args.model else {})}
            if args.model_id:
                call_args["model_id"] = args.model_id
            out(await client.call("take_over", **call_args), _print_take_over)
    return 0


#: Final job states that are a finished job, not a command-line error: some tracks failing
#: (``completed_with_errors``; see ``batch failures``) is an answer, like ``grep`` finding nothing.
_FINISHED_STATUSES = ("completed", "completed_with_errors", "idle")


def _final_exit_code(progress: dict) -> int:
    """``--follow``/``watch``: 0 when the job finished (some tracks may have failed), 1 when it
    failed or was cancelled."""
    return 0 if progress.get("status") in _FINISHED_STATUSES else 1


class _Following:
    """The job ``--follow`` / ``watch`` is drawing, for what Ctrl-C says."""

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.active = False
        self.redrawing = False  # a progress line is on the terminal without its newline


_following = _Following()


def _stopped_following() -> None:
    """Ctrl-C while following: the job is the daemon's and goes on; say how to get back to it."""
    if _following.redrawing:
        print(flush=True)
    job = f"batch job {_following.job_id}" if _following.job_id else "the batch job, if it started,"
    print(
        f"embedd: stopped following; {job} goes on in the daemon: 'embedd batch watch' follows it again, "
        "'embedd batch cancel' stops it",
        file=sys.stderr,
    )


async def _follow(client: Client, as_json: bool) -> dict:
    last: dict = {}
    tty = sys.stdout.isatty() and not as_json
    _following.active = True
    async for progress in client.stream("batch_watch"):
        last = progress
        _following.job_id = progress.get("job_id") or _following.job_id
        _following.redrawing = tty
        if as_json:
            print(json.dumps(progress), flush=True)
        elif tty:
            print("\r\x1b[2K" + render_progress(progress), end="", flush=True)
        else:
            print(render_progress(progress), flush=True)
    if tty:
        print()
    _following.active = _following.redrawing = False
    return last


async def _run_batch(client: Client, args: argparse.Namespace, out: Callable) -> int:
    action = args.action
    if action == "start":
        call_args: dict[str, Any] = {"clear_existing": args.clear_existing}
        if args.models:
            call_args["models"] = args.models
        if args.shard:
            call_args["shard"] = args.shard
        _following.active = args.follow  # from the request on: a Ctrl-C may leave a job started
        r = await client.call("batch_start", **call_args)
        _following.job_id = r["job_id"]
        out(r, lambda r: print(f"started job {r['job_id']} over {r['total_tracks']} tracks"))
        if args.follow:
            final = await _follow(client, args.json)
            return _final_exit_code(final)
    elif action == "progress":
        out(await client.call("batch_progress"), lambda r: print(render_progress(r)))
    elif action == "watch":
        final = await _follow(client, args.json)
        return _final_exit_code(final)
    elif action in ("pause", "resume"):
        out(await client.call(f"batch_{action}"), lambda r: print(render_progress(r)))
    elif action == "cancel":
        out(await client.call("batch_cancel"), lambda r: print(f"job {r['status']}"))
    elif action == "failures":
        out(await client.call("batch_failures", limit=args.limit, offset=args.offset), _print_failures)
    return 0


# ---------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedd", description="Music-embedding daemon for Navidrome, and its client.")
    parser.add_argument("--version", action="version", version=f"embedd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon", description="Run the embedd daemon.")
    add_settings_arguments(serve)

    client_opts = argparse.ArgumentParser(add_help=False)
    client_opts.add_argument("--socket", default=str(default_socket_path()), help="daemon socket [env: EMBEDD_SOCKET]")
    client_opts.add_argument("--json", action="store_true", help="print the raw result as JSON")

    sub.add_parser("ping", parents=[client_opts], help="check the daemon answers")
    sub.add_parser("status", parents=[client_opts], help="models, queues, Milvus, batch job")
    p = sub.add_parser("unload", parents=[client_opts], help="unload one model or all")
    p.add_argument("model", nargs="?", choices=MODEL_NAMES)

    p = sub.add_parser("embed", parents=[client_opts], help="embed an audio file")
    p.add_argument("file")
    p.add_argument(
        "-m", "--model", dest="models", action="append", choices=MODEL_NAMES, help=f"repeatable; default {DEFAULT_MODEL}"
    )
    p.add_argument("--store", action="store_true", help="upsert into Milvus (needs --track-id)")
    p.add_argument("--track-id")

    p = sub.add_parser("text", parents=[client_opts], help="embed a text query")
    p.add_argument("text")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, choices=MODEL_NAMES)

    p = sub.add_parser("search", parents=[client_opts], help="similar tracks, by text or by a stored track")
    p.add_argument("text", nargs="?", help="a text query (muq)")
    p.add_argument("--track-id", help="tracks similar to this stored track")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, choices=MODEL_NAMES)
    p.add_argument("-n", "--limit", type=int, default=20)
    p.add_argument("--exclude", action="append", metavar="TRACK_ID")

    p = sub.add_parser(
        "mix", parents=[client_opts], help="a playlist from seed tracks, texts or files (the recommender)",
        description="Recommend tracks near the seeds: stored tracks (--track-id), texts (--text, through MuQ-MuLan; "
        "bridged for mert and latent) and audio files (--file, embedded first). Seeds, excluded tracks and the "
        "negative prompts' neighbours are kept out or pushed down; see docs/protocol.md (recommend).",
    )  # fmt: skip
    p.add_argument("--track-id", dest="track_ids", action="append", metavar="TRACK_ID", help="a stored seed track")
    p.add_argument("--text", dest="texts", action="append", metavar="TEXT", help="a text seed")
    p.add_argument("--file", dest="files", action="append", metavar="PATH", help="an audio file as a seed")
    p.add_argument("-m", "--model", dest="models", action="append", choices=MODEL_NAMES, help="repeat for several; default muq")
    p.add_argument("-n", "--limit", type=int, default=25)
    p.add_argument("-d", "--diversity", type=float, default=0.0, help="0 (pure similarity) ... 1 (spread widely)")
    p.add_argument("--exclude", action="append", metavar="TRACK_ID")
    p.add_argument("--not", dest="negative", action="append", metavar="TEXT", help="a negative prompt")
    p.add_argument("--library", action="append", type=int, metavar="ID", help="only tracks of this Navidrome library")
    p.add_argument("--dislike-artist", action="append", metavar="ARTIST_ID")
    p.add_argument("--merge", choices=("union", "intersection", "priority"))
    p.add_argument("--min-agreement", type=int, metavar="N", help="union: found by at least N models")

    p = sub.add_parser(
        "drop-legacy", parents=[client_opts], help="drop the original system's collections embedd moved aside",
        description="List the collections of the system embedd replaced that embedd moved aside when its own set "
        "took over their names (<collection>__legacy); with --yes, drop them. Collections still serving a public name "
        "are never dropped.",
    )  # fmt: skip
    p.add_argument("-m", "--model", choices=MODEL_NAMES, help="only this model's; default all")
    p.add_argument("--yes", action="store_true", help="drop them (without it, only say what would be dropped)")

    p = sub.add_parser(
        "take-over", parents=[client_opts], help="keep the original system's vectors instead of re-embedding",
        description="Adopt the vectors of the system embedd replaced: each row of its collections whose name "
        "(\"Artist - Title\") is exactly one Navidrome track's and whose model_id is the configured model's is stored "
        "for that track, so the next incremental job skips it. Names of no track or of several are listed, never "
        "guessed. The original's collections are only read.",
    )  # fmt: skip
    p.add_argument("-m", "--model", choices=MODEL_NAMES, help="only this model's; default all")
    p.add_argument("--model-id", help="the model_id the original's rows carry, when embedd loads the same weights "
                   "from another source (needs --model)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="only say what would be adopted")

    batch = sub.add_parser("batch", help="re-embed the whole library")
    bsub = batch.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = bsub.add_parser("start", parents=[client_opts], help="start a job")
    p.add_argument(
        "-m", "--model", dest="models", action="append", choices=MODEL_NAMES,
        help=f"repeatable; default {', '.join(DEFAULT_JOB_MODELS)}",
    )  # fmt: skip
    p.add_argument("--clear-existing", action="store_true", help="re-embed every track (old vectors stay until done)")
    p.add_argument("--shard", help="i/n: embed only shard i of n")
    p.add_argument("-f", "--follow", action="store_true", help="draw live progress until the job ends")
    for action, text in (
        ("progress", "the job's progress"),
        ("watch", "follow the job's progress live"),
        ("pause", "pause the job and free the GPU"),
        ("resume", "resume a paused job"),
        ("cancel", "cancel the job"),
    ):
        bsub.add_parser(action, parents=[client_opts], help=text)
    p = bsub.add_parser("failures", parents=[client_opts], help="tracks that failed in the latest job")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    from embedd.client import Unreachable

    try:
        return asyncio.run(_run_client(args))
    except Unreachable as exc:
        print(f"embedd: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 3
    except EmbeddError as exc:
        print(f"embedd: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if _following.active:
            _stopped_following()
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
