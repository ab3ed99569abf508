"""``embedd take-over`` and ``drop-legacy``: the collections of the system embedd replaced, adopted or dropped."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

from embedd.cli.render import rows

if TYPE_CHECKING:
    from embedd.client import Client

__all__ = ["print_drop_legacy", "print_take_over", "run"]


async def run(client: Client, args: argparse.Namespace, out: Callable) -> int:
    if args.command == "drop-legacy":
        call_args = {"confirm": args.yes, **({"model": args.model} if args.model else {})}
        out(await client.call("drop_legacy", **call_args), print_drop_legacy)
    elif args.command == "take-over":
        call_args = {"dry_run": args.dry_run, **({"model": args.model} if args.model else {})}
        if args.model_id:
            call_args["model_id"] = args.model_id
        out(await client.call("take_over", **call_args), print_take_over)
    return 0


def print_drop_legacy(r: dict) -> None:
    found = r["collections"]
    if not found:
        print("no legacy collection to drop")
        return
    verb = "dropped" if r["dropped"] else "would drop"
    for c in found:
        print(f"{verb} {c['collection']} ({c['model']}, {rows(c['rows'])})")
    if not r["dropped"]:
        print("run again with --yes to drop them")


def print_take_over(r: dict) -> None:
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
