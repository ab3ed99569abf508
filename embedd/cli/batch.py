"""``embedd batch``: starting the library job, its progress (drawn live by ``--follow`` and ``watch``,
with the Ray cluster's workers when it runs on one), pause, resume, cancel and its failed tracks.

Following a job exits 0 when it finished (``completed`` or ``completed_with_errors``) and 1 when it
``failed`` or was ``cancelled``; Ctrl-C while following leaves the job running in the daemon
(:func:`stopped_following` says so).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, Callable

from embedd.cli.render import cluster_lines, plural, render_progress

if TYPE_CHECKING:
    from embedd.client import Client

__all__ = ["following", "print_progress", "run", "stopped_following"]

#: Final job states that are a finished job, not a command-line error: some tracks failing
#: (``completed_with_errors``; see ``batch failures``) is an answer, like ``grep`` finding nothing.
_FINISHED_STATUSES = ("completed", "completed_with_errors", "idle")


def final_exit_code(progress: dict) -> int:
    """``--follow``/``watch``: 0 when the job finished (some tracks may have failed), 1 when it
    failed or was cancelled."""
    return 0 if progress.get("status") in _FINISHED_STATUSES else 1


class _Following:
    """The job ``--follow`` / ``watch`` is drawing, for what Ctrl-C says."""

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.active = False
        self.redrawing = False  # a progress line is on the terminal without its newline


following = _Following()


def stopped_following() -> None:
    """Ctrl-C while following: the job is the daemon's and goes on; say how to get back to it."""
    if following.redrawing:
        print(flush=True)
    job = f"batch job {following.job_id}" if following.job_id else "the batch job, if it started,"
    print(
        f"embedd: stopped following; {job} goes on in the daemon: 'embedd batch watch' follows it again, "
        "'embedd batch cancel' stops it",
        file=sys.stderr,
    )


async def follow(client: Client, as_json: bool) -> dict:
    last: dict = {}
    tty = sys.stdout.isatty() and not as_json
    following.active = True
    async for progress in client.stream("batch_watch"):
        last = progress
        following.job_id = progress.get("job_id") or following.job_id
        following.redrawing = tty
        if as_json:
            print(json.dumps(progress), flush=True)
        elif tty:
            print("\r\x1b[2K" + render_progress(progress, cluster=True), end="", flush=True)
        else:
            print(render_progress(progress, cluster=True), flush=True)
    if tty:
        print()
    following.active = following.redrawing = False
    return last


async def run(client: Client, args: argparse.Namespace, out: Callable) -> int:
    action = args.action
    if action == "start":
        call_args: dict[str, Any] = {"clear_existing": args.clear_existing}
        if args.models:
            call_args["models"] = args.models
        if args.shard:
            call_args["shard"] = args.shard
        following.active = args.follow  # from the request on: a Ctrl-C may leave a job started
        r = await client.call("batch_start", **call_args)
        following.job_id = r["job_id"]
        out(r, lambda r: print(f"started job {r['job_id']} over {r['total_tracks']} tracks"))
        if args.follow:
            final = await follow(client, args.json)
            return final_exit_code(final)
    elif action == "progress":
        out(await client.call("batch_progress"), print_progress)
    elif action == "watch":
        final = await follow(client, args.json)
        return final_exit_code(final)
    elif action in ("pause", "resume"):
        out(await client.call(f"batch_{action}"), print_progress)
    elif action == "cancel":
        out(await client.call("batch_cancel"), lambda r: print(f"job {r['status']}"))
    elif action == "failures":
        out(await client.call("batch_failures", limit=args.limit, offset=args.offset), print_failures)
    return 0


def print_progress(r: dict) -> None:
    """The job's progress line, then its Ray cluster and workers when it runs on one."""
    print(render_progress(r))
    if r.get("cluster"):
        for line in cluster_lines(r["cluster"]):
            print(line)


def print_failures(r: dict) -> None:
    # The progress counts failed tracks; a track fails once per model it failed for.
    tracks = r.get("tracks", r["total"])
    print(f"{plural(tracks, 'failed track')}, {plural(r['total'], 'failure')} (one per track and model)")
    for f in r["failures"]:
        print(f"  {f['code']:<13} {f['model']:<7} {f['path'] or f['track_id']}: {f['message']}")
