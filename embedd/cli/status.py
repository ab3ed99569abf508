"""``embedd ping``, ``status`` and ``unload``: what the daemon is doing, and freeing its models."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Callable

from embedd.cli.render import cluster_lines, render_progress, rows

if TYPE_CHECKING:
    from embedd.client import Client

__all__ = ["print_status", "run"]


async def run(client: Client, args: argparse.Namespace, out: Callable) -> int:
    if args.command == "ping":
        r = await client.call("ping")
        out(r, lambda r: print(f"pong: embedd {r['version']}, protocol {r['protocol']}, up {r['uptime_s']:.0f} s"))
    elif args.command == "status":
        out(await client.call("status"), print_status)
    elif args.command == "unload":
        call_args = {"model": args.model} if args.model else {}
        out(await client.call("unload", **call_args), lambda r: print("unloaded: " + (", ".join(r["unloaded"]) or "nothing")))
    return 0


def print_status(r: dict) -> None:
    print(f"embedd {r['version']} on {r['device']}")
    print(f"milvus: {r['milvus']['uri']} ({'ok' if r['milvus']['ok'] else 'unreachable'})")
    lanes = (r.get("executor") or {}).get("lanes")
    if lanes:
        for lane, v in lanes.items():
            print(f"{'lane ' + lane + ':':<17} {lane_line(v)}")
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
        print(f"  {name:<7} {model_state(m):<24} dim {m['dim']:<6} -> {m['collection']}{text}")
        if m.get("error"):  # the last load attempt failed (the docs promise it here)
            print(f"          error: {m['error']}")
    batch = r.get("batch")
    if batch and batch.get("job_id"):
        print("batch: " + render_progress(batch))
    else:
        print("batch: no job has run")
    if batch and batch.get("cluster"):  # the job's model work runs on a Ray cluster
        for line in cluster_lines(batch["cluster"]):
            print(line)
    watch = r.get("library_watch")
    if watch:
        print("library: " + watch_line(watch))
    for c in r.get("legacy_collections") or []:
        where = "still serves its public name" if c["serving"] else "kept; embedd drop-legacy removes it"
        print(f"legacy: {c['collection']} ({c['model']}, {rows(c['rows'])}): {where}")


def model_state(m: dict) -> str:
    state = m.get("state") or ("idle" if m["loaded"] else "unloaded")
    if state == "running":
        text = f"running ({', '.join(m.get('running') or [])})"
    elif state == "idle":
        text = f"loaded, idle {m['idle_s']:.0f}s" if m.get("idle_s") is not None else "loaded"
    else:
        text = {"unloaded": "not loaded", "loading": "loading"}.get(state, state)
    return text + (", in job" if m.get("pinned") else "")


def lane_line(v: dict) -> str:
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


def watch_line(w: dict) -> str:
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
