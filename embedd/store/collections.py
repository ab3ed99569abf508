"""The collection owner: which physical collection serves each model, and every change to that.

Aliases. The public name of a model's collection (``embedding``, ...) is a
Milvus ALIAS of one of embedd's own physical collections (names in
:mod:`embedd.store.layout`). Reads and writes go through the alias, so whoever
switches it (this daemon, or another shard's) is followed at once. A rebuild
(:meth:`Collections.begin_rebuild`) writes into ``<public>__r_<tag>``, named by
a caller-given tag (the batch job id), so after a crash the same call reopens
the rows already written; :meth:`Collections.commit_rebuild` switches the alias
in one ``alter_alias`` (atomic: a search sees the old or the new set, never a
mix or nothing) and then drops embedd's OWN other collections of that model
(the old set, stale rebuilds). It never drops a collection embedd did not
write: only :meth:`Collections.drop_legacy`, the operator's command, does.

The original system's collection. A REAL collection found under a public name
(the system embedd replaces created them; another schema, readers of its own)
is left exactly where it is, so its readers keep working, while embedd fills
its own ``<public>__base`` and serves its own searches from there (the model
is *pending*). Only when embedd's set is complete — a committed rebuild, or an
incremental job over the whole library that completed with vectors stored
(:meth:`Collections.adopt_public_name`) — does the public name move: the old
collection is renamed ``<public>__legacy`` and the alias created on embedd's
set. Those are two calls; a crash between them leaves the public name
unresolved, and the next :meth:`Collections.ensure` finishes the move.

Schema 1 (embedd's own collections from before the ``embedding``/``name``
fields) is copied into schema 2 on first use, without re-embedding: rows are
read page by page and upserted with the vector field renamed and ``name``
added. An aliased collection is copied to ``<public>__m_<suffix>``, the alias
switched (atomically), and the old one dropped if it is embedd's own (a
``__legacy`` collection an earlier embedd adopted is kept, listed as legacy).
A rebuild or pending collection, which has no alias, is copied to the
``__m_`` name, dropped and the copy renamed back; a crash at any point is
resumed by the next call (copies are upserts by primary key). The copy blocks
the store thread: about as long as the batch job takes to upsert that many rows.

Index. HNSW (M=50, efConstruction=250) with the COSINE metric is requested on
``embedding``; a server or Lite build that rejects it gets AUTOINDEX, then FLAT.
``name`` gets INVERTED (Milvus Lite, servers from 2.4) or Trie (2.3 servers);
:attr:`Physical` records what each collection got.

Vectors wider than the server allows (MERT: 76,800 dims; Milvus servers reject
more than ``proxy.maxDimension`` = 32,768): the creation is refused and the
collection is created SPLIT instead: ``k = ceil(dim / 32768)`` equal parts (the
last zero-padded), each track stored as ``k`` rows ``"<track_id>#<i>"`` with
``part`` = i, every row carrying the track's fields and ``name``. One
collection with a part field, not ``k`` collections or vector fields: one
alias switches atomically, a track's parts are upserted and deleted in one
call, and 2.3 servers allow one vector field per collection. The layout is
recorded in the collection's description and read back from it.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from embedd.errors import Code, EmbeddError
from embedd.store import indexes, rows
from embedd.store.client import Milvus, is_refused_parameter
from embedd.store.layout import (
    ROW_FIELDS,
    SERVER_MAX_DIM,
    VECTOR_FIELD,
    Kind,
    Layout,
    LegacyCollection,
    RebuildHandle,
    base_name,
    describe,
    free_legacy_name,
    is_legacy,
    is_own,
    migrated_name,
    rebuild_name,
    schema_for,
    upgraded,
)

log = logging.getLogger("embedd.store")


@dataclasses.dataclass(slots=True)
class Model:
    """Everything this process knows of one model's collections: the live set, an open rebuild, read freshness."""

    name: str
    public: str
    address: str  # the alias; or embedd's own set while a foreign collection holds the public name
    layout: Layout
    rebuild: RebuildHandle | None = None  # an open rebuild in this process: live writes are mirrored into it
    #: the live set changed under this process (alias switched, rows deleted): the next read is Strong
    changed: bool = False

    @property
    def pending(self) -> bool:
        """A foreign collection still holds the public name: embedd's set is addressed directly."""
        return self.address != self.public


@dataclasses.dataclass(slots=True)
class Physical:
    """What this process learnt of one physical collection when it created or opened it."""

    layout: Layout | None = None  # known for rebuild collections (the live set's is on its Model)
    vector_index: str = ""  # the index type the server accepted ("" = not created here)
    name_index: str | None = None  # the scalar index on `name` ("" = none accepted; None = not created here)


class Collections:
    def __init__(self, milvus: Milvus) -> None:
        self.milvus = milvus
        self.models: dict[str, Model] = {}
        self.physical: dict[str, Physical] = {}

    @property
    def timeout_s(self) -> float:
        return self.milvus.timeout_s

    def _known(self, physical: str) -> Physical:
        return self.physical.setdefault(physical, Physical())

    def open_rebuild(self, model: str) -> RebuildHandle | None:
        """The rebuild of ``model`` open in this process, if any (live writes are mirrored into it)."""
        m = self.models.get(model)
        return m.rebuild if m is not None else None

    def model(self, model: str) -> Model:
        try:
            return self.models[model]
        except KeyError:
            raise EmbeddError(Code.INTERNAL, f"the store was not prepared for model {model} (call ensure).") from None

    # -- opening ---------------------------------------------------------------------------

    def ensure(self, model: str, public: str, dim: int, *, for_rebuild: bool = False) -> None:
        """Make ``public`` usable for ``model``'s ``dim``-wide vectors (module docstring). Idempotent.

        A live set of another dim raises ``UNAVAILABLE``: those vectors came from
        another model, and only a ``clear_existing`` rebuild can replace them. That
        rebuild passes ``for_rebuild=True``: the old set is then opened as it is
        (it keeps answering searches by stored track) and the rebuild gets the new dim.
        """
        m = self.milvus
        names = m.names()
        target = m.alias_target(public, names)
        foreign_target = target is not None and describe(target, m.describe(target)).kind is Kind.FOREIGN
        if public in names or foreign_target:
            address = physical = self._own_unaliased(model, public, base_name(public), dim, names)
        else:
            if target is None:  # first use, or a move of the public name interrupted after the rename
                target = base_name(public)
                if target not in names:
                    self._create(model, target, dim)
                m.create_alias(target, public)
                log.info("Milvus alias %s now points at %s", public, target)
            address, physical = public, target
        layout = self._open(physical)
        if layout.kind is Kind.PREVIOUS:
            layout = self._upgrade_aliased(model, public, layout)
        # The live set stays registered even when its width is wrong for this model:
        # searches by stored track and an open rebuild still use it, and every write
        # checks the vector's width anyway.
        # Re-opening (every op prepares its model) keeps what this process knows: an open
        # rebuild to mirror into, and whether the next read must be Strong.
        before = self.models.get(model)
        self.models[model] = Model(
            name=model, public=public, address=address, layout=layout,
            rebuild=before.rebuild if before else None,
            changed=bool(before and (before.changed or before.layout.physical != layout.physical)),
        )  # fmt: skip
        if layout.dim != dim and not for_rebuild:
            raise EmbeddError(
                Code.UNAVAILABLE,
                f"Milvus collection {public} holds {layout.dim}-dim vectors but model {model} produces "
                f"{dim}-dim ones; run a clear_existing batch to rebuild it.",
            )

    def _own_unaliased(self, model: str, public: str, physical: str, dim: int, names: list[str]) -> str:
        """Open (creating, finishing an interrupted schema copy, or copying) an own collection without alias."""
        tmp = migrated_name(public, physical)
        if physical not in names and tmp in names:  # the copy was complete and the original dropped
            self.milvus.rename(tmp, physical)
        elif physical not in names:
            self._create(model, physical, dim)
            return physical
        layout = self._open(physical)
        if layout.kind is Kind.PREVIOUS:
            self._upgrade_in_place(model, public, layout)
        return physical

    def _open(self, physical: str) -> Layout:
        layout = describe(physical, self.milvus.describe(physical))
        if layout.kind is Kind.FOREIGN:
            raise EmbeddError(Code.INTERNAL, f"Milvus collection {physical} is not one of embedd's (its schema is foreign).")
        if layout.kind is Kind.CURRENT:
            present = set(self.milvus.call(f"list indexes of {physical}", lambda c: c.list_indexes(physical)))
            if VECTOR_FIELD not in present:  # created just before a crash: finish the job
                self._known(physical).vector_index = indexes.vector_index(self.milvus, physical)
            if "name" not in present:
                self._known(physical).name_index = indexes.name_index(self.milvus, physical)
        self.milvus.load(physical)
        return layout

    # -- creating --------------------------------------------------------------------------

    def _create(self, model: str, physical: str, dim: int, parts: int | None = None) -> Layout:
        """A current-schema collection for ``dim``-wide vectors: plain if the server allows, else split.

        ``parts``: exactly this layout (a schema copy keeps its source's).

        No error code says "too wide" (:func:`~embedd.store.client.is_refused_parameter`),
        so a refused parameter is taken for the width: the next try has parts of
        at most the default servers' ``maxDimension``, then of half the width each
        time (a server configured lower). A refusal splitting cannot cure thus
        costs at most about log2(dim) more tries, and then the first one is raised.
        """
        n = parts or 1
        first: EmbeddError | None = None
        while True:
            schema = schema_for(model, dim, n)
            try:
                self.milvus.call(
                    f"create collection {physical}",
                    lambda c: c.create_collection(physical, schema=schema, consistency_level="Strong", timeout=self.timeout_s),
                )
                break
            except EmbeddError as err:
                refused = err.code is Code.INTERNAL and is_refused_parameter(err.__cause__ or err)
                if not refused or parts is not None or math.ceil(dim / n) <= 1:
                    if first is not None and refused:
                        raise first from first.__cause__
                    raise
                first = first or err
                n = max(n * 2, math.ceil(dim / SERVER_MAX_DIM))
        self._known(physical).vector_index = indexes.vector_index(self.milvus, physical)
        self._known(physical).name_index = indexes.name_index(self.milvus, physical)
        self.milvus.load(physical)
        if n > 1:
            log.info("collection %s stores %d-dim vectors split in %d parts of %d", physical, dim, n, math.ceil(dim / n))
        return Layout(physical=physical, dim=dim, parts=n, part_dim=math.ceil(dim / n))

    # -- schema 1 -> 2 ---------------------------------------------------------------------

    def _copy(self, model: str, src: Layout, dst_name: str) -> Layout:
        """Copy every row of the schema-1 ``src`` into the current-schema ``dst_name`` (created if absent)."""
        names = self.milvus.names()
        dst = self._open(dst_name) if dst_name in names else self._create(model, dst_name, src.dim, parts=src.parts)
        fields = ["track_id", *ROW_FIELDS, src.vector_field, *(("pk", "part") if src.split else ())]
        copied = 0
        for page in rows.scan(self.milvus, src.physical, fields, page_size=rows.rows_per_call(src)):
            rows.write(self.milvus, dst_name, dst, [upgraded(r) for r in page])
            copied += len(page)
        log.warning("copied %d rows of %s (embedd schema 1) into %s (schema 2)", copied, src.physical, dst_name)
        return dst

    def _upgrade_aliased(self, model: str, public: str, src: Layout) -> Layout:
        dst_name = migrated_name(public, src.physical)
        dst = self._copy(model, src, dst_name)
        self.milvus.switch_alias(dst_name, public)
        if is_own(public, src.physical):
            self.milvus.drop(src.physical)
        else:
            log.warning("kept %s (adopted from the system embedd replaced) beside its copy %s", src.physical, dst_name)
        return dst

    def _upgrade_in_place(self, model: str, public: str, src: Layout) -> Layout:
        tmp = migrated_name(public, src.physical)
        self._copy(model, src, tmp)
        self.milvus.drop(src.physical)
        self.milvus.rename(tmp, src.physical)
        return self._open(src.physical)

    # -- the public name -------------------------------------------------------------------

    def adopt_public_name(self, model: str) -> str | None:
        """embedd's set of ``model`` is complete: move the foreign collection aside, alias the public name.

        Returns the name the foreign collection is kept under (None when the model
        was not pending). Idempotent; a crash half-way is finished by ``ensure``.
        """
        m = self.model(model)
        if not m.pending:
            return None
        legacy = self._take_public_name(m.public, m.layout.physical)
        m.address = m.public
        m.changed = True
        return legacy

    def _take_public_name(self, public: str, physical: str) -> str | None:
        names = self.milvus.names()
        legacy: str | None = None
        if public in names:
            legacy = free_legacy_name(public, names)
            self.milvus.rename(public, legacy)
            self.milvus.create_alias(physical, public)
            try:  # a rename releases the collection on Milvus Lite: keep it readable, as it was
                self.milvus.load(legacy)
            except EmbeddError as err:
                log.warning("could not load the legacy collection %s: %s", legacy, err.message)
        else:
            target = self.milvus.alias_target(public, names)
            if target is None:
                self.milvus.create_alias(physical, public)
            elif target != physical:
                self.milvus.switch_alias(physical, public)
                legacy = target if describe(target, self.milvus.describe(target)).kind is Kind.FOREIGN else None
        if legacy is not None:
            log.warning("embedd's set %s took over the name %s; the collection found there is kept as %s", physical, public, legacy)
        return legacy

    def legacy_collections(self, publics: dict[str, str]) -> list[LegacyCollection]:
        """Foreign collections under (``serving``) or beside (``__legacy``) the public names; model -> public."""
        names = self.milvus.names()
        found = []
        for model, public in publics.items():
            for name in sorted(n for n in names if n == public or is_legacy(public, n)):
                found.append(LegacyCollection(name, public, model, self.milvus.row_count(name), serving=name == public))
        return found

    def drop_legacy(self, publics: dict[str, str], *, confirm: bool) -> list[LegacyCollection]:
        """The kept legacy collections of these models; dropped only with ``confirm``. Serving ones are never dropped."""
        kept = [c for c in self.legacy_collections(publics) if not c.serving]
        if confirm:
            for c in kept:
                self.milvus.drop(c.collection)
                log.warning("dropped legacy collection %s (%s rows) on the operator's command", c.collection, c.rows)
        return kept

    # -- rebuilds --------------------------------------------------------------------------

    def begin_rebuild(self, model: str, tag: str, dim: int | None = None) -> RebuildHandle:
        """Open (create, or reopen after a crash) the rebuild collection of ``model`` named by ``tag``.

        ``tag`` must be stable across restarts of the job (its job id). ``dim``
        defaults to the model's current dim; a new model may bring another one.
        """
        m = self.model(model)
        dim = dim or m.layout.dim
        physical = rebuild_name(m.public, tag)
        names = self.milvus.names()
        committed = self.milvus.alias_target(m.public, names) == physical
        tmp = migrated_name(m.public, physical)
        resumed = physical in names or tmp in names
        if resumed:
            self._own_unaliased(model, m.public, physical, dim, names)
            layout = self._open(physical)
            if layout.dim != dim:
                raise EmbeddError(Code.INTERNAL, f"rebuild collection {physical} holds {layout.dim}-dim vectors, not {dim}.")
        else:
            layout = self._create(model, physical, dim)
        self._known(physical).layout = layout
        handle = RebuildHandle(
            model=model, public=m.public, physical=physical, tag=tag, dim=dim, resumed=resumed, committed=committed
        )
        if not committed:
            m.rebuild = handle
        return handle

    def rebuild_layout(self, handle: RebuildHandle) -> Layout:
        known = self._known(handle.physical)
        if known.layout is None:
            known.layout = self._open(handle.physical)
        return known.layout

    def list_rebuilds(self, model: str) -> list[str]:
        """Physical rebuild collections of ``model`` that no alias points at (pending or stale)."""
        m = self.model(model)
        names = self.milvus.names()
        live = self.milvus.alias_target(m.public, names)
        prefix = f"{m.public}__r_"
        return sorted(n for n in names if n.startswith(prefix) and n != live)

    def commit_rebuild(self, handle: RebuildHandle) -> None:
        """Point the public name at the rebuilt collection, then drop embedd's other ones. Idempotent.

        A foreign collection holding the public name is moved aside (kept), not dropped.
        """
        m = self.model(handle.model)
        self._take_public_name(handle.public, handle.physical)
        m.layout = self.rebuild_layout(handle)
        m.address = m.public
        m.changed = True
        m.rebuild = None
        for name in self.milvus.names():
            if is_own(handle.public, name) and name != handle.physical:
                self.milvus.drop(name)
                self.physical.pop(name, None)

    def abort_rebuild(self, handle: RebuildHandle) -> bool:
        """Drop the rebuild collection (the live one is untouched); False if it was already live or gone."""
        m = self.models.get(handle.model)
        if m is not None and m.rebuild is not None and m.rebuild.physical == handle.physical:
            m.rebuild = None
        self.physical.pop(handle.physical, None)
        names = self.milvus.names()
        if handle.physical not in names or self.milvus.alias_target(handle.public, names) == handle.physical:
            return False
        self.milvus.drop(handle.physical)
        return True

    # -- a reader that follows this owner (the store's read lane) ---------------------------

    def hand_over(self) -> tuple[dict[str, tuple[str, str, Layout]], set[str]]:
        """What a reader needs of each model, and the models whose next read must be Strong.

        ``({model: (public, address, layout)}, {model, ...})``. The Strong flags are
        handed over, not copied: this owner's own reads of the live set are the
        batch job's (counts and scans, Strong anyway), so from here on the reader's
        next search is the one that must wait for the server's time tick.
        """
        view = {name: (m.public, m.address, m.layout) for name, m in self.models.items()}
        strong = {name for name, m in self.models.items() if m.changed}
        for name in strong:
            self.models[name].changed = False
        return view, strong

    def follow(self, view: dict[str, tuple[str, str, Layout]], strong: set[str]) -> None:
        """Take the owner's view (:meth:`hand_over`): a reader never opens or changes a collection itself."""
        for name, (public, address, layout) in view.items():
            before = self.models.get(name)
            self.models[name] = Model(
                name=name, public=public, address=address, layout=layout,
                changed=name in strong or bool(before and (before.changed or before.layout.physical != layout.physical)),
            )  # fmt: skip

    def target(self, model: str, handle: RebuildHandle | None) -> tuple[str, Layout]:
        """(name to address, its layout): the live set, or a rebuild's physical collection."""
        m = self.model(model)
        if handle is None:
            return m.address, m.layout
        if handle.model != model:
            raise EmbeddError(Code.INTERNAL, f"rebuild handle for {handle.model} used with model {model}.")
        return handle.physical, self.rebuild_layout(handle)
