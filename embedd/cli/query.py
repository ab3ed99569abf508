"""``embedd embed``, ``text``, ``search`` and ``mix``: embedding a file or a text, similar tracks, playlists."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from embedd.cli.render import fmt_vector
from embedd.errors import Code, EmbeddError
from embedd.protocol import DEFAULT_MODEL

if TYPE_CHECKING:
    from embedd.client import Client

__all__ = ["print_embed", "print_hits", "print_mix", "run"]


async def run(client: Client, args: argparse.Namespace, out: Callable) -> int:
    cmd = args.command
    if cmd == "embed":
        call_args = {"path": str(Path(args.file).absolute()), "models": args.models or [DEFAULT_MODEL], "store": args.store}
        if args.track_id:
            call_args["track_id"] = args.track_id
        out(await client.call("embed_file", **call_args), print_embed)
    elif cmd == "text":
        r = await client.call("embed_text", text=args.text, model=args.model)
        out(r, lambda r: print(f"{r['model']}: dim {r['dim']} vector {fmt_vector(r['vector'])} raw {fmt_vector(r['raw'])}"))
    elif cmd == "search":
        call_args = {"model": args.model, "limit": args.limit}
        if args.text:
            call_args["text"] = args.text
        elif args.track_id:
            call_args["track_id"] = args.track_id
        if args.exclude:
            call_args["exclude_track_ids"] = args.exclude
        out(await client.call("search", **call_args), print_hits)
    elif cmd == "mix":
        if not (args.track_ids or args.texts or args.files):
            raise EmbeddError(Code.BAD_REQUEST, "mix: give at least one --track-id, --text or --file")
        out(await client.call("recommend", **await mix_args(client, args)), print_mix)
    return 0


def print_embed(r: dict) -> None:
    print(f"duration {r['duration_s']:.1f} s")
    for name, m in r["models"].items():
        print(f"  {name:<7} dim {m['dim']:<6} windows {m['windows']:<4} vector {fmt_vector(m['vector'])}")


def print_hits(r: dict) -> None:
    hits = r["hits"]
    if not hits:
        print("no results")
        return
    for rank, hit in enumerate(hits, 1):
        who = " - ".join(x for x in (hit.get("artist"), hit.get("title")) if x) or hit.get("path") or hit["track_id"]
        print(f"{rank:>3}. {hit['score']:.4f}  {who}  [{hit['track_id']}]")


def print_mix(r: dict) -> None:
    for warning in r["warnings"]:
        print(f"warning: {warning}")
    if not r["tracks"]:
        print("no results")
    for rank, t in enumerate(r["tracks"], 1):
        who = " - ".join(x for x in (t.get("artist"), t.get("title")) if x) or t.get("path") or t["track_id"]
        print(f"{rank:>3}. {t['score']:.4f}  {who}  [{t['track_id']}]  {t['reason']} ({','.join(t['models'])})")


async def mix_args(client: Client, args: argparse.Namespace) -> dict:
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
