"""The Go client's response types keep step with what a real daemon sends.

The daemon's answers are plain maps; ``clients/go/embedd/*.go`` describes them
by hand, as structs with ``msgpack:"..."`` tags. A key the daemon sends that no
Go field names is silently dropped by the Go decoder, so the two drift apart
unnoticed (``ModelStatus`` once lacked ``error``). Here one real daemon (the
tiny models, a small Navidrome library, Milvus Lite) answers every op the Go
client decodes, and every key of every answer, at every level, must be a tag
of the Go struct the client decodes it into, with a value of a compatible
kind. The Go fields no answer ever carried are checked against a short list
of known exceptions, so drift in that direction shows up too.

Which struct decodes which op is read from the Go sources themselves
(``var out T`` + ``c.call(..., "op", ...)``): a new method in the Go client
fails here until this test exercises its op.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from collections import defaultdict
from typing import Any

import pytest

from tests.batch_fixtures import BatchDaemon, Library
from tests.daemon import REPO, read_frame, send_frame, short_tmpdir

GO_DIR = REPO / "clients" / "go" / "embedd"

# The ops the Go client decodes into a struct, and that struct (checked against the Go sources below).
OPS = {
    "ping": "PingResult",
    "status": "StatusResult",
    "embed_file": "EmbedFileResult",
    "embed_text": "EmbedTextResult",
    "search": "SearchResult",
    "recommend": "RecommendResult",
    "batch_start": "BatchStartResult",
    "batch_progress": "Progress",
    "batch_pause": "Progress",
    "batch_resume": "Progress",
    "batch_watch": "Progress",
    "batch_cancel": "BatchCancelResult",
    "batch_failures": "BatchFailuresResult",
    "unload": "UnloadResult",
}
ENVELOPE = "response"  # every frame (frame.go); its "error" is a wireError

# Go fields no answer in this test carries, and why (none: every key is sent, if only as null).
NEVER_SENT_HERE: set[str] = set()
# Structs no answer here instantiates (always null or empty), each checked by a test of its own below:
# compile = off in tests (compiling takes minutes), a fresh store holds no legacy collection, and this
# daemon runs its jobs in process (the Ray cluster's view is tests/test_ray.py's).
NOT_INSTANTIATED_HERE = {"CompileStatus", "LegacyCollection", "ClusterStatus", "ClusterWorker"}

_GO_SCALARS = {
    "string": (str,),
    "bool": (bool,),
    "int": (int,),
    "int32": (int,),
    "int64": (int,),
    "uint64": (int,),
    "float32": (int, float),
    "float64": (int, float),
}
_OPAQUE = {"any", "interface{}", "msgpack.RawMessage"}
_CUSTOM = {"Vector": (bytes, list)}  # its own DecodeMsgpack: a float32 bin or a list of numbers


# ---------------------------------------------------------------------------
# the Go side: structs, their tags, and which op each method decodes
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GoField:
    name: str
    type: str
    tag: str


def _go_sources() -> str:
    return "\n".join(p.read_text() for p in sorted(GO_DIR.glob("*.go")) if not p.name.endswith("_test.go"))


def parse_go_types(source: str) -> tuple[dict[str, dict[str, GoField]], dict[str, str]]:
    """struct name -> {wire key: field}, and named non-struct types -> their underlying type."""
    structs: dict[str, dict[str, GoField]] = {}
    # a struct's body: up to the "}" on its own line, or on the same line (struct{ msg string })
    for m in re.finditer(r"^type (\w+) struct\s*\{([^\n]*\}$|\n.*?^\})", source, re.M | re.S):
        fields: dict[str, GoField] = {}
        for line in m.group(2).splitlines():
            f = re.match(r"\s*(\w+)\s+([\w.\[\]*{}]+)\s+`([^`]*)`", line)
            if not f:
                continue
            # vmihailenco/msgpack reads the msgpack tag; a json tag only where there is none
            tag = re.search(r'\bmsgpack:"([^",]*)', f.group(3)) or re.search(r'\bjson:"([^",]*)', f.group(3))
            if tag and tag.group(1) not in ("", "-"):
                assert tag.group(1) not in fields, f"{m.group(1)}: two fields for {tag.group(1)!r}"
                fields[tag.group(1)] = GoField(f.group(1), f.group(2), tag.group(1))
        structs[m.group(1)] = fields
    named = dict(re.findall(r"^type (\w+) ([\w.\[\]]+)\s*$", source, re.M))
    return structs, named


def go_decoded_ops(source: str) -> dict[str, str]:
    """op -> the struct its Go method decodes into, read from the method bodies."""
    calls = re.findall(r"var out (\w+)\n\s*if err := c\.call\(ctx, [^,]+, \"(\w+)\"", source)
    ops = {op: typ for typ, op in calls}
    if re.search(r"func \(c \*Client\) progressOp\(.*?var out Progress", source, re.S):
        ops.update((op, "Progress") for op in re.findall(r"c\.progressOp\(ctx, \"(\w+)\"\)", source))
    if re.search(r"c\.request\(\"batch_watch\".*?var p Progress", source, re.S):
        ops["batch_watch"] = "Progress"
    return ops


GO_SOURCE = _go_sources()
GO_STRUCTS, GO_NAMED = parse_go_types(GO_SOURCE)


class Checker:
    """Walks an answer against a Go type; collects mismatches and the tags seen per struct."""

    def __init__(self) -> None:
        self._errors: dict[str, str] = {}  # one per place (list indexes folded), the first value shown
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.valued: dict[str, set[str]] = defaultdict(set)  # keys seen with a value other than null

    @property
    def errors(self) -> list[str]:
        return list(self._errors.values())

    def _error(self, path: str, message: str) -> None:
        place = re.sub(r"\[\d+\]", "[]", path) + message.split(" (value")[0]
        self._errors.setdefault(place, f"{path}: {message}")

    def _mismatch(self, path: str, go_type: str, value: Any) -> None:
        self._error(path, f"Go has {go_type}, the daemon sent {type(value).__name__} (value {value!r:.80})")

    def check(self, value: Any, go_type: str, path: str) -> None:
        if value is None:  # nil decodes into any Go type (the zero value)
            return
        go_type = go_type.lstrip("*")
        if go_type not in GO_STRUCTS and go_type not in _CUSTOM:
            go_type = GO_NAMED.get(go_type, go_type)  # type Code string
        if go_type.startswith("[]"):
            if go_type == "[]byte" and isinstance(value, bytes):
                return
            if not isinstance(value, list):
                self._mismatch(path, go_type, value)
                return
            for i, item in enumerate(value):
                self.check(item, go_type[2:], f"{path}[{i}]")
        elif go_type.startswith("map["):
            key_type, _, elem = go_type[4:].partition("]")
            if not isinstance(value, dict):
                self._mismatch(path, go_type, value)
                return
            for k, v in value.items():
                if key_type == "string" and not isinstance(k, str):
                    self._error(path, f"a {type(k).__name__} key {k!r} in a Go {go_type}")
                self.check(v, elem, f"{path}.{k}")
        elif go_type in GO_STRUCTS:
            if not isinstance(value, dict):
                self._mismatch(path, f"struct {go_type}", value)
                return
            fields = GO_STRUCTS[go_type]
            self.seen[go_type]  # noqa: B018 -- instantiated, even if empty
            for key, v in value.items():
                self.seen[go_type].add(key)
                if v is not None:
                    self.valued[go_type].add(key)
                if key not in fields:
                    self._error(f"{path}.{key}", f"{go_type} has no field for it (value {v!r:.80})")
                    continue
                self.check(v, fields[key].type, f"{path}.{key}")
        elif go_type in _CUSTOM:
            if not isinstance(value, _CUSTOM[go_type]):
                self._mismatch(path, go_type, value)
        elif go_type in _GO_SCALARS:
            ok = _GO_SCALARS[go_type]
            if not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok):
                self._mismatch(path, go_type, value)
        elif go_type not in _OPAQUE:
            self._error(path, f"the test does not know the Go type {go_type!r}")

    def check_frame(self, op: str, frame: dict) -> None:
        self.check(frame, ENVELOPE, f"{op}<frame>")
        if op == "<error>":
            assert frame["ok"] is False and frame["error"]["code"] == "not_found", frame
            self.check(frame["error"], "wireError", "error")
        else:
            assert frame.get("ok"), f"{op} failed: {frame.get('error')}"
            self.check(frame["result"], OPS[op], op)


# ---------------------------------------------------------------------------
# one daemon answers every op the Go client decodes
# ---------------------------------------------------------------------------


def _watch(d: BatchDaemon, rid: int, timeout: float = 60.0) -> list[dict]:
    """batch_watch frames until more: false (the job's final status)."""
    frames = []
    with d.connect(timeout=timeout) as s:
        send_frame(s, {"op": "batch_watch", "id": rid, "interval_s": 0.05})
        while True:
            f = read_frame(s)
            frames.append(f)
            if not f.get("ok") or not f.get("more"):
                return frames


@pytest.fixture(scope="module")
def answers(tiny_models) -> list[tuple[str, dict]]:
    """(op, whole response frame) for every op of OPS, from one daemon, in an order that fills every part."""
    root = short_tmpdir("eg-")
    lib = Library(root / "lib")
    lib.add_broken()  # the first job: only files that fail (in the decoder, no model runs)
    d = BatchDaemon(root / "d", lib, tiny_models)
    out: list[tuple[str, dict]] = []

    def call(op: str, **args: Any) -> dict:
        frame = d.call(op, **args)
        assert frame.get("ok"), f"{op} failed: {frame.get('error')}\n{d.log()}"
        out.append((op, frame))
        return frame["result"]

    began = time.monotonic()
    d.start()
    try:
        call("ping")
        call("status")  # nothing loaded, no job yet
        call("batch_progress")  # idle: nulls
        call("batch_start", models=["muq"])
        frames = _watch(d, 1)
        out += [("batch_watch", f) for f in frames]
        assert frames[-1]["result"]["status"] == "completed_with_errors", frames[-1]
        assert call("batch_failures", limit=3)["failures"]

        # A job long enough to pause, resume and cancel: many rows over one small file.
        good = lib.add_good(60, rows_per_file=60, duration_s=1.0)
        call("batch_start", models=["muq"])
        assert call("batch_pause")["status"] == "paused"
        call("status")  # a paused job
        assert call("batch_resume")["status"] == "running"
        assert call("batch_cancel")["status"] == "cancelling"
        frames = _watch(d, 2)
        out += [("batch_watch", f) for f in frames]
        assert frames[-1]["result"]["status"] == "cancelled", frames[-1]

        path = str(lib.path_of(good[0]))
        for i, fmt in enumerate(("bin", "list")):
            models = ["muq", "mert", "latent"]
            call("embed_file", path=path, models=models, store=True, track_id=f"t{i}", vector_format=fmt)
            call("embed_text", text="calm piano at night", vector_format=fmt)
        assert call("search", model="muq", text="calm piano", limit=3)["hits"]
        call("search", model="latent", track_id="t0", limit=3)
        tracks = call(
            "recommend",
            seeds=[{"track_id": "t0", "source": "recent"}, {"text": "calm piano"}],
            models=["muq", "latent"], negative_prompts=["harsh noise"], limit=5,
        )["tracks"]  # fmt: skip
        assert tracks and any(t.get("negative_similarity") is not None for t in tracks), tracks
        call("recommend", seeds=[])  # no seed: a warning, no tracks
        call("status")  # models loaded and idle, recent passes and jobs
        call("batch_progress")  # a finished job
        call("unload", model="muq")
        call("unload")
        out.append(("<error>", d.call("batch_pause")))  # nothing to pause: not_found
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{len(out)} answers in {time.monotonic() - began:.1f} s")
    return out


@pytest.fixture(scope="module")
def checked(answers) -> Checker:
    checker = Checker()
    for op, frame in answers:
        checker.check_frame(op, frame)
    return checker


def _reachable(roots: set[str]) -> set[str]:
    """The Go structs reachable from these (through pointers, slices and maps)."""
    todo, found = list(roots), set()
    while todo:
        name = todo.pop()
        if name in found or name not in GO_STRUCTS:
            continue
        found.add(name)
        todo += [re.sub(r"^(\*|\[\]|map\[\w+\])+", "", f.type) for f in GO_STRUCTS[name].values()]
    return found


def test_the_go_client_decodes_exactly_the_ops_exercised_here():
    assert go_decoded_ops(GO_SOURCE) == OPS
    for name in {*OPS.values(), ENVELOPE, "wireError"}:
        assert GO_STRUCTS.get(name), f"no Go struct {name} with tags in {GO_DIR}"


def test_every_key_the_daemon_sends_is_a_field_of_the_go_type(answers, checked):
    assert {op for op, _ in answers} == {*OPS, "<error>"}
    assert not checked.errors, "the Go client's types miss what the daemon sends:\n" + "\n".join(checked.errors)


def test_every_go_field_is_sent_by_the_daemon(checked):
    """The other direction: a Go field no answer carries is stale (or a case this test should reach)."""
    reachable = _reachable({*OPS.values(), ENVELOPE})
    exercised = reachable & set(checked.seen)
    unseen = {f"{name}.{tag}" for name in exercised for tag in set(GO_STRUCTS[name]) - checked.seen[name]}
    assert unseen == NEVER_SENT_HERE, (
        f"Go fields never sent: {sorted(unseen - NEVER_SENT_HERE)}; listed but sent: {sorted(NEVER_SENT_HERE - unseen)}"
    )
    assert reachable - set(checked.seen) == NOT_INSTANTIATED_HERE
    only_null = sorted(f"{n}.{t}" for n in checked.seen for t in checked.seen[n] - checked.valued[n])
    print(f"\nsent, but only as null here: {', '.join(only_null)}")


# ---------------------------------------------------------------------------
# what no answer above carries: the same keys, from the code that builds them
# ---------------------------------------------------------------------------


def test_compile_status_view_matches_go():
    import contextlib

    import torch

    from embedd.models.compiled import CompiledForward

    view = CompiledForward("m", lambda x: x, torch.zeros(1, 4), context=contextlib.nullcontext).view()
    view["cache"] = {"hits": 1, "misses": 0}  # what a finished compilation holds
    checker = Checker()
    checker.check(view, "CompileStatus", "compile")
    assert not checker.errors, checker.errors
    assert set(view) == set(GO_STRUCTS["CompileStatus"])


def test_legacy_collection_matches_go():
    from embedd.store.layout import LegacyCollection

    found = LegacyCollection(collection="embedding__legacy", public="embedding", model="muq", rows=3, serving=False)
    wire = found.to_wire()
    checker = Checker()
    checker.check([wire], "[]LegacyCollection", "legacy_collections")
    assert not checker.errors, checker.errors
    assert set(wire) == set(GO_STRUCTS["LegacyCollection"])


def test_cluster_status_matches_go(tmp_path):
    from embedd.cluster.bridge import _Worker
    from embedd.cluster.client import RayCluster
    from embedd.settings import build_settings

    settings = build_settings({"socket": str(tmp_path / "s.sock"), "data_dir": str(tmp_path / "d"), "ray_address": "auto"})
    cluster = RayCluster(settings)
    worker = _Worker("gpu-0", {"num_gpus": 1}, "cuda", host="desktop", pid=42, done=3, first_at=0.0, last_error="x")
    cluster.workers = [worker.view(now=60.0)]
    cluster.error, cluster.down_since = "lost", 1.0
    view = cluster.view()
    checker = Checker()
    checker.check(view, "ClusterStatus", "cluster")
    assert not checker.errors, checker.errors
    assert set(view) == set(GO_STRUCTS["ClusterStatus"])
    assert set(view["workers"][0]) == set(GO_STRUCTS["ClusterWorker"])


# ---------------------------------------------------------------------------
# the daemon's response Structs against the Go structs, with no daemon
# ---------------------------------------------------------------------------


def _struct_keys_match(py: type, go: str, path: str, errors: list[str]) -> None:
    """The Struct's keys are the Go struct's tags; nested Structs against the Go field's struct type."""
    from msgspec import inspect as mi

    fields = {f.encode_name: f for f in mi.type_info(py).fields}
    go_fields = GO_STRUCTS[go]
    for key in sorted(set(fields) - set(go_fields)):
        errors.append(f"{path}: the daemon's {py.__name__} sends {key!r}, Go's {go} has no field for it")
    for key in sorted(set(go_fields) - set(fields)):
        errors.append(f"{path}: Go's {go} has {key!r}, the daemon's {py.__name__} never sends it")
    for key in sorted(set(fields) & set(go_fields)):
        inner = _struct_in(fields[key].type)
        go_type = re.sub(r"^(\*|\[\]|map\[string\])+", "", go_fields[key].type)
        if inner is not None and go_type in GO_STRUCTS:
            _struct_keys_match(inner, go_type, f"{path}.{key}", errors)


def _struct_in(t: Any) -> type | None:
    from msgspec import inspect as mi

    if isinstance(t, mi.StructType):
        return t.cls
    for attr in ("types", "item_type", "value_type"):
        inner = getattr(t, attr, None)
        for x in inner if isinstance(inner, tuple) else (inner,) if inner is not None else ():
            found = _struct_in(x)
            if found is not None:
                return found
    return None


def test_the_go_structs_hold_exactly_the_keys_of_the_response_structs():
    """Every op the Go client decodes: its Go struct's tags are the op's response Struct's keys, nested too."""
    from embedd.ops import OPS as TABLE

    errors: list[str] = []
    for op, go in sorted(OPS.items()):
        _struct_keys_match(TABLE[op].result, go, op, errors)
    assert not errors, "\n".join(errors)


def test_the_go_op_list_is_the_op_table():
    from embedd.ops import OPS as TABLE
    from embedd.ops.reference import go_source

    assert (GO_DIR / "ops_gen.go").read_text() == go_source(), "run: python -m embedd.ops.reference --write"
    assert set(OPS) <= set(TABLE)  # every op the Go client decodes is served
