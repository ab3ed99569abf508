"""Where a track's file is: ``media_file.path`` turned into the path the daemon opens, and back.

Its own module because this is the part that differs between Navidrome
versions and between hosts, and which the reader, the daemon's path check and
the re-keying of moved tracks must all get the same way.

Two path layouts exist, told apart by the schema (:class:`~embedd.library.database.Schema`):

* ``relative`` (Navidrome >= 0.55, the "new scanner"): a ``library`` table
  (several libraries possible), ``media_file.path`` relative to
  ``library.path`` with ``/`` separators, and a ``media_file.missing`` flag for
  files the scanner no longer finds. Detected by ``media_file.missing``; the
  same migration added that column and stripped the library prefix.
* ``absolute`` (older Navidrome): ``media_file.path`` is the absolute path.
  Versions 0.52-0.54 already have a ``library`` table (one row, the music
  folder) but still absolute paths.

``music_root`` (``NAVIDROME_MUSIC_ROOT``) is for a daemon that sees the music
at another mount than Navidrome does. It replaces the *original root*, the
directory Navidrome's paths hang from:

* relative layout: the longest common directory of all ``library.path``
  values. With one library that is exactly ``library.path``; with libraries
  ``/music/a`` and ``/music/b`` it is ``/music``, so ``music_root=/mnt/nas``
  maps them to ``/mnt/nas/a`` and ``/mnt/nas/b`` (mount their common parent).
* absolute layout: ``original_root`` when given (Navidrome's ``MusicFolder``),
  else the common directory of the library paths when a ``library`` table
  exists, else the longest common directory of all track paths (computed from
  the smallest and the largest path, two index look-ups). The last guess equals
  Navidrome's music folder as soon as the library holds two top-level folders;
  a library of a single artist folder needs ``original_root``.

A path outside the original root is left as it is (it fails later with a
per-track error that names it, instead of being silently misplaced).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Awaitable, Callable

from embedd.library.database import Schema

__all__ = ["Roots", "common_dir", "daemon_path", "load_roots", "stored_path"]


@dataclasses.dataclass(slots=True)
class Roots:
    """How to turn a row's path into the path the daemon opens (one iteration's view)."""

    libraries: dict[int, str]  # relative layout: library id -> daemon-visible root
    original: str | None  # absolute layout: the prefix music_root replaces (None: no remap)
    replacement: str | None


def common_dir(paths: list[str]) -> str | None:
    """The longest common directory of ``paths``; None when there are none or they mix absolute and relative."""
    paths = [os.path.normpath(p) for p in paths if p]
    if not paths:
        return None
    try:
        return os.path.commonpath(paths)
    except ValueError:  # mixed absolute and relative
        return None


async def load_roots(
    schema: Schema,
    fetch: Callable[[str], Awaitable[list]],
    *,
    music_root: str | None,
    original_root: str | None,
) -> Roots:
    """The roots of the database now: ``fetch`` runs one SQL statement and returns its rows.

    ``music_root`` and ``original_root`` are normalised (or None), as
    :class:`~embedd.library.reader.NavidromeLibrary` keeps them.
    """
    lib_paths: dict[int, str] = {}
    if schema.has_library_table:
        for lib_id, lib_path in await fetch("SELECT id, path FROM library"):
            lib_paths[int(lib_id)] = os.path.normpath(lib_path)
    if schema.layout == "relative":
        if music_root is not None and lib_paths:
            common = common_dir(list(lib_paths.values()))
            if common is not None:
                lib_paths = {
                    i: os.path.normpath(os.path.join(music_root, os.path.relpath(p, common)))
                    for i, p in lib_paths.items()
                }
        return Roots(lib_paths, None, None)
    if music_root is None:
        return Roots({}, None, None)
    original = original_root
    if original is None and lib_paths:
        original = common_dir(list(lib_paths.values()))
    if original is None:
        where = " WHERE NOT +missing" if schema.has_missing else ""
        rows = await fetch(f"SELECT min(path), max(path) FROM media_file{where}")
        lo, hi = rows[0] if rows else (None, None)
        if lo and hi:
            original = common_dir([lo, hi])
            if original in (os.path.normpath(lo), os.path.normpath(hi)):  # a file, not its folder
                original = os.path.dirname(original)
    return Roots({}, original, music_root)


def daemon_path(path: str, library_id: int | None, roots: Roots, schema: Schema) -> str | None:
    """The path the daemon opens for a row's ``path`` and ``library_id``; None when its library is gone."""
    if schema.layout == "relative":
        root = roots.libraries.get(int(library_id)) if library_id is not None else None
        if root is None:
            return None  # its library row is gone (Navidrome deletes such tracks by cascade)
        return os.path.normpath(os.path.join(root, path.replace("\\", "/").lstrip("/")))
    full = path
    original = roots.original
    if original is not None and roots.replacement is not None:
        norm = os.path.normpath(path)
        if norm == original or norm.startswith(original.rstrip("/") + "/"):
            full = os.path.normpath(roots.replacement + "/" + norm[len(original) :].lstrip("/"))
    return full


def stored_path(full: str, roots: Roots, schema: Schema) -> tuple[int | None, str] | None:
    """The (library id, media_file.path) a daemon-visible path was read from: :func:`daemon_path` backwards."""
    norm = os.path.normpath(full)
    if schema.layout == "relative":
        for lib_id, root in roots.libraries.items():
            if norm.startswith(root.rstrip("/") + "/"):
                return lib_id, norm[len(root.rstrip("/")) + 1 :]
        return None
    if roots.original is not None and roots.replacement is not None:
        replacement = roots.replacement.rstrip("/")
        if norm.startswith(replacement + "/"):
            return None, os.path.normpath(roots.original + "/" + norm[len(replacement) + 1 :])
    return None, norm
