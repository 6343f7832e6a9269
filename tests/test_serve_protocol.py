"""The serve protocol under hostile input (hypothesis): every client message either parses into
its record or is a ProtocolError with a short one-line reason; never another exception. Plus
the frame header and the key sampler's invariants. No model, no server."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldplay.actions import Motion
from worldplay.serve.keys import KeySampler, motion_for
from worldplay.serve.protocol import (
    KEYS,
    MAX_PROMPT_CHARS,
    MAX_TEXT_BYTES,
    Keys,
    Look,
    Played,
    ProtocolError,
    Reset,
    Start,
    pack_frame,
    parse_client_message,
    unpack_frame,
)

FAST = settings(max_examples=80, deadline=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _parses_or_refuses(data) -> None:
    try:
        record = parse_client_message(data)
    except ProtocolError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) <= 200, message
    else:
        assert isinstance(record, (Start, Keys, Look, Played, Reset))


@FAST
@given(st.text(max_size=300))
def test_any_text_parses_or_is_a_protocol_error(text):
    _parses_or_refuses(text)


@FAST
@given(st.binary(max_size=64))
def test_binary_is_always_refused(data):
    with pytest.raises(ProtocolError, match="binary"):
        parse_client_message(data)


@FAST
@given(json_values)
def test_any_json_value_parses_or_is_a_protocol_error(value):
    _parses_or_refuses(json.dumps(value))


@FAST
@given(st.sampled_from(["keys", "look", "played", "reset", "start"]), st.dictionaries(
    st.sampled_from(["down", "seq", "dx", "dy", "world", "chunk", "image", "prompt", "extra"]), json_values,
    max_size=5))
def test_messages_of_a_known_type_with_any_fields(kind, fields):
    _parses_or_refuses(json.dumps({"type": kind, **fields}))


@FAST
@given(st.frozensets(st.sampled_from(sorted(KEYS))), st.integers(0, 2**53 - 1))
def test_valid_keys_messages_round_trip(down, seq):
    assert parse_client_message(json.dumps({"type": "keys", "down": sorted(down), "seq": seq})) == Keys(down, seq)


@FAST
@given(st.text(max_size=MAX_PROMPT_CHARS).filter(lambda t: all(c.isprintable() or c in "\n\t" for c in t)),
       st.sampled_from(["sample", "upload"]), st.text(min_size=1, max_size=64).filter(str.isprintable))
def test_valid_start_messages_round_trip(prompt, which, name):
    data = json.dumps({"type": "start", "image": {which: name}, "prompt": prompt})
    if len(data.encode()) > MAX_TEXT_BYTES:
        with pytest.raises(ProtocolError, match="limit"):
            parse_client_message(data)
        return
    record = parse_client_message(data)
    assert record.prompt == prompt and (record.sample if which == "sample" else record.upload) == name


@pytest.mark.parametrize("data, reason", [
    ('{"type": "keys", "down": [], "seq": 1, "seq": 2}', "appears twice"),
    ('{"type": "look", "dx": Infinity, "dy": 0, "seq": 1}', "not a number JSON allows"),
    ('{"type": "look", "dx": 1e300, "dy": 0, "seq": 1}', "within"),
    ('{"type": "keys", "down": ["w", "w", "w", "w", "w", "w", "w", "w", "w"], "seq": 1}', "at most"),
    ('{"type": "keys", "down": ["w"], "seq": true}', "integer"),
    ('{"type": "keys", "down": ["w"], "seq": -1}', "integer"),
    ('{"type": "played", "world": 1, "chunk": 1.5}', "integer"),
    ('{"type": "start", "image": {"sample": "a", "upload": "b"}, "prompt": ""}', "image must be"),
    ('{"type": "start", "image": {"sample": ""}, "prompt": ""}', "1..64 printable"),
    ('{"type": "start", "image": {"sample": "x"}, "prompt": "a\\u0000b"}', "control characters"),
    ('{"type": "start", "image": {"sample": "x"}}', "missing prompt"),
    ('"reset"', "JSON object"),
    ('{"type": "RESET"}', "type must be one of"),
    ("[" * 4000, "not valid JSON"),
    ("x" * (MAX_TEXT_BYTES + 1), "limit"),
])
def test_hostile_messages_name_their_problem(data, reason):
    with pytest.raises(ProtocolError, match=reason):
        parse_client_message(data)


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1),
       st.binary(max_size=32))
def test_frame_headers_round_trip(world, chunk, frame, frames, jpeg):
    assert unpack_frame(pack_frame(world, chunk, frame, frames, jpeg)) == (world, chunk, frame, frames, jpeg)


def test_a_frame_without_a_header_is_refused():
    with pytest.raises(ProtocolError, match="header"):
        unpack_frame(b"\x00" * 11)


@FAST
@given(st.lists(st.one_of(
    st.tuples(st.just("keys"), st.frozensets(st.sampled_from(sorted(KEYS)))),
    st.tuples(st.just("look"), st.tuples(st.floats(-100, 100), st.floats(-100, 100))),
    st.tuples(st.just("sample"), st.none())), max_size=30))
def test_the_sampler_only_ever_gives_official_labels(events):
    """Whatever the page reports, each chunk gets one valid motion; a key held at a sample counts."""
    sampler = KeySampler()
    for seq, (kind, value) in enumerate(events, start=1):
        if kind == "keys":
            sampler.keys(value, seq)
        elif kind == "look":
            sampler.look(*value, seq)
        else:
            held = sampler.held
            sample = sampler.sample()
            assert 0 <= sample.motion.label < 81 and held <= set(sample.keys)
            assert sample.motion == motion_for(set(sample.keys), sample.dx, sample.dy)
            assert isinstance(sample.motion, Motion)
