"""The wire format: round trips, arbitrary splits, and garbage refused without hanging."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hourai.protocol import MAX_FRAME, FrameDecoder, ProtocolError, encode

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
