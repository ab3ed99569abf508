"""The ``embedd`` command line: the argument tree and :func:`main`; ``serve`` runs the daemon, the rest talk to it.

Client subcommands print something a person can read, or the raw result with
``--json`` for scripts, and exit non-zero with the daemon's own sentence when
it answers an error (exit 1), or when it cannot be reached (exit 3). Following
a batch job exits 0 when it finished (``completed`` or ``completed_with_errors``)
and 1 when it ``failed`` or was ``cancelled``.

Each command group's calls and printers live in a module of their own:
:mod:`~embedd.cli.serve` (the daemon and its logging), :mod:`~embedd.cli.status`
(``ping``, ``status``, ``unload``), :mod:`~embedd.cli.batch` (``batch ...``),
:mod:`~embedd.cli.query` (``embed``, ``text``, ``search``, ``mix``),
:mod:`~embedd.cli.legacy` (``take-over``, ``drop-legacy``), and the helpers
they share in :mod:`~embedd.cli.render`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Callable

from embedd import __version__
from embedd.cli import batch, legacy, query, status
from embedd.cli.query import print_embed, print_hits
from embedd.cli.render import json_default, render_progress
from embedd.cli.serve import cmd_serve
from embedd.cli.status import print_status
from embedd.errors import EmbeddError
from embedd.models import DEFAULT_JOB_MODELS, MODEL_NAMES
from embedd.protocol import DEFAULT_MODEL
from embedd.settings import add_settings_arguments, default_socket_path

__all__ = ["build_parser", "main", "render_progress"]

# The printers under the names tests/test_docs.py re-renders the README's tour with.
_print_embed, _print_hits, _print_status = print_embed, print_hits, print_status

#: Each client command's module (its ``run`` makes the call and prints the answer).
_COMMANDS = {
    "ping": status, "status": status, "unload": status,
    "embed": query, "text": query, "search": query, "mix": query,
    "batch": batch,
    "drop-legacy": legacy, "take-over": legacy,
}  # fmt: skip


async def _run_client(args: argparse.Namespace) -> int:
    from embedd.client import Client

    as_json: bool = args.json
    async with await Client.connect(args.socket) as client:

        def out(result: dict, human: Callable[[dict], None]) -> None:
            if as_json:
                print(json.dumps(result, default=json_default))
            else:
                human(result)

        return await _COMMANDS[args.command].run(client, args, out)


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

    batch_p = sub.add_parser("batch", help="re-embed the whole library")
    bsub = batch_p.add_subparsers(dest="action", required=True, metavar="ACTION")
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
        if batch.following.active:
            batch.stopped_following()
        return 130
