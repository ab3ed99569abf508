"""Query-string parameters of the similarity API: typed, ranged, named in every error.

AudioMuse-AI's clients send everything as query strings (``?item_id=..&n=10``);
each reader here returns the typed value or raises ``bad_request`` with a
sentence that names the parameter and what it should be.
"""

from __future__ import annotations

from typing import Mapping

from embedd.errors import Code, EmbeddError
from embedd.models import MODEL_NAMES
from embedd.protocol import DEFAULT_MODEL

__all__ = ["boolean", "integer", "model", "required"]

_TRUE = frozenset({"true", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "0", "no", "n", "off"})
MAX_ID = 256


def _bad(message: str) -> EmbeddError:
    return EmbeddError(Code.BAD_REQUEST, message)


def required(query: Mapping[str, str], *names: str) -> str:
    """The first of ``names`` that is given and not blank (aliases: ``artist`` or ``artist_id``)."""
    for name in names:
        value = query.get(name, "").strip()
        if value:
            if len(value) > MAX_ID:
                raise _bad(f"parameter {name!r} is longer than {MAX_ID} characters")
            return value
    raise _bad(f"parameter {names[0]!r} is required" + (f" (or {', '.join(map(repr, names[1:]))})" if names[1:] else ""))


def integer(query: Mapping[str, str], names: str | tuple[str, ...], default: int, low: int, high: int) -> int:
    """An integer in ``low..high``; the first of ``names`` given wins."""
    for name in (names,) if isinstance(names, str) else names:
        text = query.get(name)
        if text is None or not text.strip():
            continue
        try:
            value = int(text.strip())
        except ValueError:
            raise _bad(f"parameter {name!r} must be an integer, not {text[:40]!r}") from None
        if not low <= value <= high:
            raise _bad(f"parameter {name!r} must be between {low} and {high}, not {value}")
        return value
    return default


def boolean(query: Mapping[str, str], name: str, default: bool) -> bool:
    text = query.get(name)
    if text is None or not text.strip():
        return default
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _bad(f"parameter {name!r} must be true or false, not {text[:40]!r}")


def model(query: Mapping[str, str]) -> str:
    name = query.get("model", "").strip() or DEFAULT_MODEL
    if name not in MODEL_NAMES:
        raise _bad(f"parameter 'model': {name[:40]!r} is not one of {', '.join(MODEL_NAMES)}")
    return name
