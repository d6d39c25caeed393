"""The wire format: round trips, arbitrary splits, garbage refused without hanging, every
worker reply checked field by field, and the size bounds enforced before buffering."""

from __future__ import annotations

import re
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hourai.protocol import (
    MAX_ERROR_TEXT,
    MAX_FRAME,
    MAX_RESPONSE_HEADERS,
    MAX_SNAPSHOT_DETAILS,
    FrameDecoder,
    FrameTooLarge,
    ProtocolError,
    ResponseTooLarge,
    Violation,
    check_snapshot_message,
    check_worker_reply,
    check_zygote_message,
    encode,
    response_frame_limit,
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=200)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
messages = st.builds(
    lambda t, rest: {**rest, "t": t},
    st.text(min_size=1, max_size=12),
    st.dictionaries(st.text(max_size=10), values, max_size=6),
)


def _normalise(v: object) -> object:
    # msgpack has one array type: tuples come back as lists.
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if isinstance(v, dict):
        return {k: _normalise(x) for k, x in v.items()}
    return v


@given(st.lists(messages, min_size=1, max_size=8))
def test_any_messages_round_trip(msgs: list[dict]) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"".join(encode(m) for m in msgs)) == [_normalise(m) for m in msgs]
    assert decoder.pending == 0


@given(st.lists(messages, min_size=1, max_size=6), st.data())
def test_any_split_of_the_stream_decodes_the_same(msgs: list[dict], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = FrameDecoder()
    out: list[dict] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[prev:cut])
        prev = cut
    assert out == [_normalise(m) for m in msgs]


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=300))
def test_garbage_is_refused_or_waits_never_misreads(junk: bytes) -> None:
    """Random bytes either raise ProtocolError, or form an incomplete frame, or decode to
    real messages; the decoder never loops or returns a non-message."""
    decoder = FrameDecoder(max_frame=1024)
    try:
        msgs = decoder.feed(junk)
    except ProtocolError:
        with pytest.raises(ProtocolError):  # broken for good: the channel must be closed
            decoder.feed(encode({"t": "ok"}))
        return
    assert all(isinstance(m, dict) and isinstance(m["t"], str) for m in msgs)


def test_oversize_frame_is_refused_from_its_header_alone() -> None:
    decoder = FrameDecoder(max_frame=1000)
    with pytest.raises(ProtocolError, match=r"outside 1\.\.1000"):
        decoder.feed(struct.pack(">I", 1001))  # no body sent: must not wait for it


def test_encode_refuses_a_frame_too_large_to_send() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode({"t": "res", "body": b"x" * (MAX_FRAME + 1)})


def test_zero_length_frame_is_corrupt() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"\0\0\0\0")


@pytest.mark.parametrize(
    "payload",
    [msgpack.packb([1, 2]), msgpack.packb({"x": 1}), msgpack.packb({"t": 5}), b"\xc1"],
    ids=["array", "no-type", "int-type", "invalid-byte"],
)
def test_well_framed_non_messages_are_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


# ---------------------------------------------------------------------- worker replies


LIMIT = 4096
names = st.text(min_size=1, max_size=20)
header_lists = st.lists(st.lists(st.text(max_size=30), min_size=2, max_size=2), max_size=8)
good_res = st.fixed_dictionaries(
    {
        "t": st.just("res"),
        "id": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "status": st.integers(100, 599),
        "headers": header_lists,
        "body": st.binary(max_size=LIMIT),
    }
)
good_err = st.fixed_dictionaries(
    {
        "t": st.just("err"),
        "id": st.integers(0, 2**63 - 1),
        "error_id": st.text(max_size=12),
        "error": st.text(max_size=200),
    }
)
wrong_values = (
    st.none()
    | st.booleans()
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5)
    | st.lists(st.integers(0, 9), max_size=3)
    | st.dictionaries(st.text(max_size=3), st.integers(0, 9))
)


def _decoded(msg: dict) -> dict:
    """What the daemon's decoder hands over for ``msg``."""
    (out,) = FrameDecoder().feed(encode(msg))
    return out


@given(good_res | good_err)
def test_every_well_formed_reply_is_accepted(msg: dict) -> None:
    check_worker_reply(_decoded(msg), LIMIT)


@given(good_res | good_err, st.data())
def test_a_wrong_type_in_any_field_is_a_violation_that_names_the_frame(
    msg: dict, data: st.DataObject
) -> None:
    field = data.draw(st.sampled_from(sorted(k for k in msg if k != "t")))
    value = data.draw(wrong_values)
    ok_types = {"id": int, "status": int, "headers": list, "body": bytes, "error_id": str}
    expected = ok_types.get(field, str)
    if type(value) is expected:
        return  # not wrong after all
    bad = _decoded({**msg, field: value})
    if type(bad[field]) is expected:
        return  # msgpack made it the right type (a tuple becomes a list)
    with pytest.raises(Violation, match=f"^{msg['t']} frame: "):
        check_worker_reply(bad, LIMIT)


@given(good_res | good_err, st.data())
def test_a_missing_or_unknown_field_is_a_violation(msg: dict, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        field = data.draw(st.sampled_from(sorted(k for k in msg if k != "t")))
        bad = {k: v for k, v in msg.items() if k != field}
        match = f"missing {field}"
    else:
        extra = data.draw(names.filter(lambda n: n not in msg))
        bad = {**msg, extra: 1}
        match = "unknown"
    with pytest.raises(Violation, match=match):
        check_worker_reply(_decoded(bad), LIMIT)


@given(messages)
def test_any_message_is_accepted_or_refused_with_a_violation_never_another_error(
    msg: dict,
) -> None:
    """Whatever a hostile worker frames, the check either passes a message of exactly the
    reply shape or raises Violation: nothing else can escape into the daemon."""
    decoded = _decoded(msg)
    try:
        check_worker_reply(decoded, LIMIT)
    except Violation:
        return
    assert decoded["t"] in ("res", "err")
    assert type(decoded["id"]) is int


@given(st.integers(0, 3 * LIMIT), st.integers(1, 2 * LIMIT))
def test_a_body_is_accepted_exactly_up_to_the_limit(size: int, limit: int) -> None:
    msg = {"t": "res", "id": 1, "status": 200, "headers": [], "body": b"x" * size}
    if size <= limit:
        check_worker_reply(msg, limit)
    else:
        with pytest.raises(ResponseTooLarge, match="over max_response_size") as info:
            check_worker_reply(msg, limit)
        assert (info.value.size, info.value.limit) == (size, limit)


def test_a_bool_is_not_a_status_and_statuses_outside_http_are_refused() -> None:
    for status in (True, 99, 600, -1, 2**40):
        with pytest.raises(Violation, match="status"):
            check_worker_reply(
                {"t": "res", "id": 1, "status": status, "headers": [], "body": b""}, LIMIT
            )


def test_too_many_headers_and_too_long_errors_are_refused() -> None:
    headers = [["x", "y"]] * (MAX_RESPONSE_HEADERS + 1)
    with pytest.raises(Violation, match="headers"):
        check_worker_reply({"t": "res", "id": 1, "status": 200, "headers": headers, "body": b""}, 9)
    with pytest.raises(Violation, match="error text"):
        check_worker_reply(
            {"t": "err", "id": 1, "error_id": "e", "error": "x" * MAX_ERROR_TEXT}, LIMIT
        )


def test_a_worker_may_say_what_it_imported_and_nothing_else_that_way() -> None:
    check_worker_reply({"t": "imported", "modules": ["pandas", "numpy"]}, LIMIT)
    for bad, says in (
        ({"t": "imported", "modules": ["../x"]}, "not a module name"),
        ({"t": "imported", "modules": ["x" * 300]}, "not a module name"),
        ({"t": "imported", "modules": ["m"] * 300}, "at most"),
        ({"t": "imported", "modules": {"a": 1}}, "must be a list"),
        ({"t": "imported", "modules": [1]}, "not a module name"),
        ({"t": "imported", "modules": [], "id": 1}, "unknown 'id'"),
    ):
        with pytest.raises(Violation, match=re.escape(says)):
            check_worker_reply(bad, LIMIT)


_ZYGOTE_OK = [
    ({"t": "zygote_ready", "pid": 1, "loaded": ["flask"], "failed": [], "init_ms": 3.5}, 0),
    ({"t": "spawned", "fid": "f@v#1", "pid": 7, "nfds": 1}, 1),
    ({"t": "exited", "pid": 7, "code": 0, "signal": None, "fid": "f@v#1"}, 0),
    ({"t": "failed", "error": "cannot confine", "details": ""}, 0),
]


@pytest.mark.parametrize(("msg", "nfds"), _ZYGOTE_OK)
def test_what_a_package_zygote_sends_passes(msg, nfds) -> None:  # type: ignore[no-untyped-def]
    check_zygote_message(msg, nfds)


@pytest.mark.parametrize(
    ("msg", "nfds", "says"),
    [
        ({"t": "forked", "wid": 1, "pid": 1}, 3, "unexpected 'forked' frame"),
        ({"t": "spawned", "fid": "f", "pid": 7}, 0, "carries 0 fds, not 1"),
        ({"t": "spawned", "fid": 3, "pid": 7}, 1, "fid must be"),
        ({"t": "spawned", "fid": "f", "pid": -1}, 1, "pid must be"),
        (
            {"t": "zygote_ready", "pid": 1, "loaded": [None], "failed": [], "init_ms": 1},
            0,
            "not a module name",
        ),
        ({"t": "zygote_ready", "pid": 1, "loaded": [], "failed": []}, 0, "missing init_ms"),
    ],
)
def test_what_a_package_zygote_must_not_send_is_a_violation(msg, nfds, says) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Violation, match=re.escape(says)):
        check_zygote_message(msg, nfds)


def test_other_message_types_from_a_worker_are_violations() -> None:
    for t in ("inv", "fork", "ready", "", "res "):
        with pytest.raises(Violation, match="unexpected"):
            check_worker_reply({"t": t, "id": 1}, LIMIT)


# ---------------------------------------------------------------------- size bounds


@given(st.integers(1, 2**32 - 1), st.integers(1, 1 << 20))
def test_a_frame_over_the_bound_is_refused_from_its_header_alone(size: int, max_frame: int) -> None:
    decoder = FrameDecoder(max_frame=max_frame)
    header = struct.pack(">I", size)
    if size > max_frame:
        with pytest.raises(FrameTooLarge) as info:
            decoder.feed(header)
        assert (info.value.size, info.value.limit) == (size, max_frame)
    else:
        assert decoder.feed(header) == []  # waits for the body


@settings(max_examples=200)
@given(
    st.lists(st.binary(min_size=1, max_size=600), min_size=1, max_size=30),
    st.integers(8, 512),
)
def test_the_decoder_never_holds_more_than_one_frame_of_its_bound(
    chunks: list[bytes], max_frame: int
) -> None:
    """Whatever arrives, in whatever pieces, what is buffered after decoding is less than one
    header and one frame of the bound: an oversized frame is never accumulated."""
    decoder = FrameDecoder(max_frame=max_frame)
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except ProtocolError:
            assert decoder.pending == 0
            return
        assert decoder.pending < 4 + max_frame


@given(good_res, st.integers(1, 64))
def test_a_response_frame_within_max_response_size_fits_the_channel_bound(
    msg: dict, headers: int
) -> None:
    msg = {**msg, "headers": [["x-" + "h" * 40, "v" * 200]] * headers, "body": b"b" * LIMIT}
    FrameDecoder(max_frame=response_frame_limit(LIMIT)).feed(encode(msg))


def test_frames_behind_a_refused_one_are_never_decoded() -> None:
    """One frame at a time: the owner stops at the first bad frame, and what was sent
    behind it (a flood) costs nothing more."""
    decoder = FrameDecoder()
    good = encode({"t": "res", "id": 1})
    junk = struct.pack(">I", 3) + b"\xc1\xc1\xc1"
    decoder.push(good + junk * 1000)
    assert decoder.next() == {"t": "res", "id": 1}
    assert decoder.pending == len(junk) * 1000  # still undecoded, dropped with the channel


# --- what a snapshot may send ------------------------------------------------------------------


_SNAPSHOT_OK = [
    ({"t": "forked", "wid": 3, "pid": 2, "nfds": 3}, 3),
    ({"t": "exited", "pid": 2, "code": None, "signal": 9, "wid": 3}, 0),
    ({"t": "fork_failed", "wid": 3, "error": "fork: Resource temporarily unavailable"}, 0),
    ({"t": "ready", "kind": "wsgi", "attr": "app", "init_ms": 12.5, "pid": 1, "modules": []}, 0),
    (
        {"t": "ready", "kind": "asgi", "attr": "a", "init_ms": 1, "pid": 1, "modules": ["numpy"]},
        0,
    ),
    ({"t": "failed", "error": "SyntaxError", "details": "Traceback ..."}, 0),
]


@pytest.mark.parametrize(("msg", "nfds"), _SNAPSHOT_OK)
def test_what_a_snapshot_sends_passes(msg, nfds) -> None:  # type: ignore[no-untyped-def]
    check_snapshot_message(msg, nfds)


@pytest.mark.parametrize(
    ("msg", "nfds", "says"),
    [
        ({"t": "inv", "id": 1}, 0, "unexpected 'inv' frame"),
        ({"t": "forked", "wid": 3, "pid": 2}, 0, "carries 0 fds, not 3"),
        ({"t": "forked", "wid": "3", "pid": 2, "nfds": 3}, 3, "wid must be"),
        ({"t": "exited", "pid": 2, "code": "x", "signal": None, "wid": 1}, 0, "code must be"),
        (
            {"t": "ready", "kind": "evil", "attr": "a", "init_ms": 1, "pid": 1, "modules": []},
            0,
            "kind must",
        ),
        (
            {"t": "ready", "kind": "wsgi", "attr": "a", "init_ms": 1, "modules": []},
            0,
            "missing pid",
        ),
        (
            {"t": "ready", "kind": "wsgi", "attr": "a", "init_ms": 1, "pid": 1, "modules": "os"},
            0,
            "modules must be a list",
        ),
        (
            {"t": "ready", "kind": "wsgi", "attr": "a", "init_ms": 1, "pid": 1, "modules": ["a b"]},
            0,
            "is not a module name",
        ),
        (
            {"t": "failed", "error": "e", "details": "x" * (MAX_SNAPSHOT_DETAILS + 1)},
            0,
            "details must be a string of at most",
        ),
        ({"t": "fork_failed", "wid": 1, "error": "e", "extra": 1}, 0, "unknown 'extra'"),
    ],
)
def test_what_a_snapshot_must_not_send_is_a_violation(msg, nfds, says) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Violation, match=re.escape(says)):
        check_snapshot_message(msg, nfds)


_KEYS = st.sampled_from(["t", "wid", "pid", "code", "kind", "x"])
_VALUES = st.integers() | st.text(max_size=5) | st.none()


@given(st.dictionaries(_KEYS, _VALUES, max_size=6), st.integers(0, 4))
def test_any_snapshot_frame_is_accepted_or_refused_never_crashes(msg, nfds) -> None:  # type: ignore[no-untyped-def]
    msg.setdefault("t", "ready")
    try:
        check_snapshot_message(msg, nfds)
    except Violation:
        pass
