"""The output helpers the client commands share: ``--json``'s encoder, vectors, durations, counts,
a batch job's progress line and its Ray cluster (the ``cluster`` key of ``batch_progress``)."""

from __future__ import annotations

import math
import time
from typing import Any

__all__ = ["cluster_lines", "cluster_summary", "render_progress"]


def fmt_vector(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<{len(value) // 4} float32>"
    if isinstance(value, list):
        return f"<{len(value)} floats>"
    return str(value)


def json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        import numpy as np

        if len(value) % 4 == 0:
            return np.frombuffer(value, dtype="<f4").tolist()
        return value.hex()
    raise TypeError(type(value).__name__)


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def rows(n: int | None) -> str:
    return "? rows" if n is None else f"{n} rows"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render_progress(p: dict, *, cluster: bool = False) -> str:
    """A batch job's progress on one line; ``cluster``: with the Ray cluster in a few words (``batch watch``)."""
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
        line += f"ETA {duration(eta - time.time()) if eta else '?'} "
    line += str(p.get("status"))
    if p.get("waiting"):  # why a running job is stalled (Milvus, the Ray cluster)
        line += f" ({p['waiting']})"
    if cluster and p.get("cluster"):
        line += f" | {cluster_summary(p['cluster'])}"
    if p.get("current_track"):
        line += f" | {p['current_track']}"
    return line


def cluster_lines(c: dict) -> list[str]:
    """The Ray cluster the job's model work runs on: its state, then one line per model worker.

    ``c`` is the ``cluster`` key of ``batch_progress`` (:meth:`embedd.cluster.client.RayCluster.view`).
    """
    head = f"ray: {c.get('address')} {c.get('state')}"
    if c.get("state") in ("down", "fallback") and c.get("error"):
        head += f": {c['error']}"
    if c.get("state") in ("down", "fallback") and c.get("down_since") is not None:
        how = "models run in the daemon" if c["state"] == "fallback" else "the job waits for it"
        head += f" (for {duration(time.time() - c['down_since'])}; {how})"
    lines = [head]
    workers = c.get("workers") or []
    name_w = max((len(str(w.get("name"))) for w in workers), default=0)
    state_w = max((len(str(w.get("state"))) for w in workers), default=0)
    for w in workers:
        rate = w.get("tracks_per_hour")
        where = ", ".join(str(part) for part in (w.get("device"), w.get("allocator")) if part)
        line = (
            f"  {w.get('name')!s:<{name_w}}  {w.get('state')!s:<{state_w}}  {w.get('host') or '?'} ({where})  "
            f"{w.get('tracks_done', 0)} done, {w.get('tracks_failed', 0)} failed, "
            f"{'?' if rate is None else f'{rate:.1f}'} tracks/h"
        )
        if w.get("in_flight"):
            line += f", {w['in_flight']} in flight"
        if w.get("restarts"):
            line += f", {plural(w['restarts'], 'restart')}"
        lines.append(line)
        if w.get("last_error"):
            lines.append(f"  {'':<{name_w}}  last error: {w['last_error']}")
    return lines


def cluster_summary(c: dict) -> str:
    """The cluster in a few words, for the one redrawn line of ``batch watch``."""
    workers = c.get("workers") or []
    ready = sum(1 for w in workers if w.get("state") == "ready")
    return f"ray {c.get('state')}, {ready}/{plural(len(workers), 'worker')} ready"
