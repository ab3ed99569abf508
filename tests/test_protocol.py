"""Frames and request validation: unit and property-based tests of the parsers."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedd.errors import Code, EmbeddError
from embedd.ops import SCHEMAS as OP_SCHEMAS
from embedd.ops import parse_request
from embedd.protocol import (
    FrameDecoder,
    Request,
    decode_body,
    decode_vector,
    encode_frame,
    encode_vector,
)

MAX = 4096


def frames_of(*messages: dict) -> bytes:
    return b"".join(encode_frame(m) for m in messages)


def feed(decoder: FrameDecoder, data: bytes) -> list[bytes]:
    """Feed bytes and take every body they complete."""
    decoder.feed(data)
    bodies = []
    while (body := decoder.next_body()) is not None:
        bodies.append(body)
    return bodies


# -- FrameDecoder --------------------------------------------------------------------


def test_frames_split_at_every_byte_boundary():
    data = frames_of({"op": "ping", "id": 1}, {"op": "status", "id": "two"}, {"op": "ping", "x": b"\x00" * 300})
    for cut in range(len(data) + 1):
        decoder = FrameDecoder(MAX)
        bodies = feed(decoder, data[:cut]) + feed(decoder, data[cut:])
        assert [decode_body(b) for b in bodies] == [
            {"op": "ping", "id": 1},
            {"op": "status", "id": "two"},
            {"op": "ping", "x": b"\x00" * 300},
        ]
        assert decoder.pending == 0


def test_byte_by_byte_feeding():
    data = frames_of(*({"op": "ping", "id": i} for i in range(20)))
    decoder = FrameDecoder(MAX)
    bodies = [b for i in range(len(data)) for b in feed(decoder, data[i : i + 1])]
    assert [decode_body(b)["id"] for b in bodies] == list(range(20))


@pytest.mark.parametrize("length", [0, MAX + 1, 2**32 - 1])
def test_bad_lengths_are_rejected_from_the_header_alone(length):
    decoder = FrameDecoder(MAX)
    with pytest.raises(EmbeddError) as info:
        feed(decoder, struct.pack(">I", length))  # no body at all
    assert info.value.code is Code.BAD_FRAME
    assert str(length) in info.value.message


def test_length_of_exactly_max_frame_is_fine():
    decoder = FrameDecoder(MAX)
    assert feed(decoder, struct.pack(">I", MAX) + b"\x00" * MAX) == [b"\x00" * MAX]


def test_pending_counts_an_incomplete_frame():
    decoder = FrameDecoder(MAX)
    assert feed(decoder, b"\x00\x00\x00\x05ab") == []
    assert decoder.pending == 6 and decoder.incomplete()
    assert feed(decoder, b"cde") == [b"abcde"]
    assert decoder.pending == 0 and not decoder.incomplete()


# -- decode_body ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", msgpack.packb([1]), msgpack.packb({"a": 1}) + b"x", msgpack.packb({b"op": "ping"}), msgpack.packb({None: 1})],
)
def test_decode_body_rejects_non_maps(body):
    with pytest.raises(EmbeddError) as info:
        decode_body(body)
    assert info.value.code is Code.BAD_FRAME


# -- parse_request -------------------------------------------------------------------


def bad(message: dict) -> EmbeddError:
    with pytest.raises(EmbeddError) as info:
        parse_request(message)
    return info.value


def test_every_op_parses_with_its_defaults():
    minimal = {
        "embed_file": {"path": "/x.mp3"},
        "embed_text": {"text": "piano"},
        "search": {"model": "muq", "text": "piano"},
    }
    for op in OP_SCHEMAS:
        request = parse_request({"op": op, **minimal.get(op, {})})
        assert isinstance(request, Request) and request.op == op


def test_defaults_match_the_contract():
    r = parse_request({"op": "embed_file", "path": "/a.flac"}).args
    assert r.models == ["muq"] and r.store is False and r.vector_format == "bin"
    r = parse_request({"op": "search", "model": "mert", "track_id": "t"}).args
    assert r.limit == 20 and r.exclude_track_ids == []
    r = parse_request({"op": "batch_start"}).args
    assert r.models == ["muq", "mert", "latent"] and r.clear_existing is False and r.shard is None
    assert parse_request({"op": "batch_watch"}).args.interval_s == 1.0
    r = parse_request({"op": "batch_failures"}).args
    assert (r.limit, r.offset) == (100, 0)
    assert parse_request({"op": "embed_text", "text": "t"}).args.model == "muq"


@pytest.mark.parametrize(
    "message, culprit",
    [
        ({"op": "ping", "verbose": True}, "verbose"),
        ({"op": "embed_file"}, "path"),
        ({"op": "embed_file", "path": "/a", "data": b"x", "filename": "a"}, "path"),
        ({"op": "embed_file", "data": b"x"}, "filename"),
        ({"op": "embed_file", "path": "/a", "store": True}, "track_id"),
        ({"op": "embed_file", "path": "/a", "models": []}, "models"),
        ({"op": "embed_file", "path": "/a", "models": ["muq", "muq"]}, "models"),
        ({"op": "embed_file", "path": "/a", "models": ["clap"]}, "models"),
        ({"op": "embed_file", "path": "/a", "vector_format": "hex"}, "vector_format"),
        ({"op": "embed_text", "text": ""}, "text"),
        ({"op": "embed_text", "text": "   "}, "text"),
        ({"op": "embed_text", "text": 5}, "text"),
        ({"op": "search", "model": "muq"}, "vector"),
        ({"op": "search", "model": "muq", "text": "a", "track_id": "b"}, "vector"),
        ({"op": "search", "model": "muq", "text": "a", "limit": 0}, "limit"),
        ({"op": "search", "model": "muq", "text": "a", "limit": 1001}, "limit"),
        ({"op": "search", "model": "muq", "text": "a", "limit": 5.0}, "limit"),
        ({"op": "search", "model": "muq", "vector": b"\x00\x00\x00"}, "vector"),
        ({"op": "search", "model": "muq", "text": "a", "exclude_track_ids": [1]}, "exclude_track_ids"),
        ({"op": "search", "model": "muq", "text": "a", "exclude_track_ids": ["t"] * 10_001}, "exclude_track_ids"),
        ({"op": "batch_start", "clear_existing": "yes"}, "clear_existing"),
        ({"op": "batch_failures", "offset": -1}, "offset"),
        ({"op": "batch_watch", "interval_s": 0}, "interval_s"),
        ({"op": "unload", "model": "clap"}, "model"),
    ],
)
def test_bad_requests_name_the_culprit(message, culprit):
    error = bad(message)
    assert error.code is Code.BAD_REQUEST
    assert culprit in error.message and message["op"] in error.message


def test_unknown_op_and_missing_op():
    assert bad({"op": "dance"}).code is Code.UNKNOWN_OP
    assert bad({"id": 1}).code is Code.BAD_REQUEST
    assert bad({"op": 7}).code is Code.BAD_REQUEST


@pytest.mark.parametrize("rid", [1.5, True, [1], {"a": 1}, b"id", "x" * 300, 2**64])
def test_unusable_ids_are_bad_requests(rid):
    assert bad({"id": rid, "op": "ping"}).code is Code.BAD_REQUEST


@pytest.mark.parametrize("rid", [None, 0, -5, 2**63, "abc", ""])
def test_usable_ids(rid):
    assert parse_request({"id": rid, "op": "ping"}).id == rid


def test_vectors_round_trip_in_both_formats():
    v = np.random.default_rng(0).standard_normal(17).astype(np.float32)
    as_bin = encode_vector(v, "bin")
    assert isinstance(as_bin, bytes) and len(as_bin) == 17 * 4
    assert np.array_equal(np.frombuffer(as_bin, "<f4"), v)
    as_list = encode_vector(v, "list")
    assert isinstance(as_list, list) and len(as_list) == 17
    assert np.array_equal(decode_vector(as_bin), decode_vector(as_list))


# -- properties: whatever arrives, the answer is a frame or a contract error -----------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
op_names = st.sampled_from(sorted(OP_SCHEMAS) + ["nope", ""])
arg_keys = st.sampled_from(
    ["id", "path", "data", "filename", "models", "store", "track_id", "name", "vector_format", "text", "model",
     "vector", "limit", "exclude_tracks_ids", "exclude_track_ids", "clear_existing", "shard", "interval_s", "offset", "x"]
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(1, 64))
def test_arbitrary_bytes_never_crash_the_reader(data, chunk):
    decoder = FrameDecoder(128)
    try:
        for i in range(0, len(data), chunk):
            for body in feed(decoder, data[i : i + chunk]):
                try:
                    parse_request(decode_body(body))
                except EmbeddError as exc:
                    assert exc.code in (Code.BAD_FRAME, Code.BAD_REQUEST, Code.UNKNOWN_OP)
    except EmbeddError as exc:
        assert exc.code is Code.BAD_FRAME


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(op_names, st.dictionaries(arg_keys, msgpack_values, max_size=5))
def test_arbitrary_requests_validate_or_fail_with_a_contract_error(op, args):
    message = {"op": op, **args}
    body = msgpack.packb(message, use_bin_type=True)
    try:
        request = parse_request(decode_body(body))
    except EmbeddError as exc:
        assert exc.code in (Code.BAD_REQUEST, Code.UNKNOWN_OP)
        assert exc.message and "\n" not in exc.message
    else:
        assert request.op == op
        assert isinstance(request.args, OP_SCHEMAS[op])


@settings(max_examples=300)
@given(msgpack_values)
def test_arbitrary_msgpack_values_as_frames(value):
    body = msgpack.packb(value, use_bin_type=True)
    try:
        parse_request(decode_body(body))
    except EmbeddError as exc:
        assert exc.code in (Code.BAD_FRAME, Code.BAD_REQUEST, Code.UNKNOWN_OP)


@pytest.mark.parametrize(
    "message, expected",
    [
        ({"op": "embed_file", "path": "/a", "models": ["clap"]}, "embed_file: argument 'models[0]': 'clap' is not one of muq, mert, latent"),
        ({"op": "search", "model": "x", "text": "t"}, "search: argument 'model': 'x' is not one of muq, mert, latent"),
        ({"op": "drop_legacy", "model": "clap"}, "drop_legacy: argument 'model': 'clap' is not one of muq, mert, latent"),
        ({"op": "unload", "model": 3}, "unload: argument 'model': expected `str | null`, got `int`"),
    ],
)
def test_model_names_come_from_the_catalogue_with_the_same_errors(message, expected):
    with pytest.raises(EmbeddError) as info:
        parse_request(message)
    assert info.value.code is Code.BAD_REQUEST and info.value.message == expected
