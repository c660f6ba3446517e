"""Protocol messages: round trips, versions, self-certifying ids, strict types, and a
table of malformed inputs."""

import json

import numpy as np
import pytest

from covspec.protocol.messages import (
    PROTOCOL_VERSION, Close, Error, Limits, Open, Opened, Ping, Pong, ProtocolError, Result, Verify, decode, encode)
from covspec.protocol.ownership import certifies, derived_form, new_owner, session_id_for

OWNER = "o" * 16
SID = session_id_for(OWNER)

EXAMPLES = [
    Open(session=SID, seq=0, owner=OWNER, prompt="what color is the circle ?",
         image=np.frombuffer(b"\x89PNG fake bytes", np.uint8), max_new_tokens=32, vocab_hash="ab" * 32,
         temperature=0.7, top_k=20, top_p=0.9, seed=5, committed=np.array([7, 8], np.int32)),
    Opened(session="s1", seq=0, token=12, position=0, done=False, prefill_ms=3.5, context_len=160),
    Verify(session="s1", seq=1, start=1, tokens=np.array([4, 5, 6], np.int32)),
    Verify(session="s1", seq=2, start=4, assumed=9, tokens=np.array([4, 5], np.int32),
           q_ids=np.array([[4, 1], [5, 2]], np.int32), q_probs=np.array([[0.75, 0.25], [1, 0]], np.float16)),
    Verify(session="s1", seq=3, start=4, tokens=np.array([4], np.int32),
           q_dense=np.full((1, 10), 0.1, np.float16)),
    Result(session="s1", seq=1, start=1, accepted=2, token=11, done=False, verify_ms=4.25),
    Result(session="s1", seq=2, start=4, status="stale"),
    Result(session="s1", seq=3, start=4, accepted=0, p_dense=np.full(10, 0.1, np.float16)),
    Close(session="s1", seq=9),
    Error(session="s1", seq=2, code="stale", message="chunk does not follow the committed tokens"),
    Ping(session="", seq=0),
    Pong(session="", seq=0, sessions=3),
]


def assert_same(a, b):
    assert type(a) is type(b)
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and np.array_equal(value, other), name
        else:
            assert value == other, name


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(message):
    frames = encode(message)
    assert isinstance(frames[0], bytes) and json.loads(frames[0])["v"] == PROTOCOL_VERSION == 4
    assert_same(message, decode(frames))


def test_a_v1_message_decodes_and_its_reply_goes_back_in_v1():
    """v1 devices are served: their messages decode (v2-only fields at their defaults),
    and a reply encoded in the request's version leaves out what v1 lacks."""
    ping = decode(with_header(encode(Ping(session="s", seq=4)), v=1))
    assert ping.version == 1
    pong = Pong(session="s", seq=4, sessions=3, forwards=9, committed=7, peak_bytes=5, version=ping.version)
    header = json.loads(encode(pong)[0])
    assert header["v"] == 1 and "forwards" not in header and header["sessions"] == 3
    back = decode(encode(pong))
    assert (back.version, back.sessions, back.forwards) == (1, 3, 0)
    assert decode(encode(Pong(session="s", seq=4, forwards=9))).forwards == 9


def test_edge_led_needs_v2():
    opened = Open(session=SID, seq=0, owner=OWNER, image=np.ones(3, np.uint8), mode="edge_led",
                  committed=np.zeros(0, np.int32))
    assert decode(encode(opened)).mode == "edge_led"
    with pytest.raises(ProtocolError, match="edge_led.*v2"):
        decode(with_header(encode(opened), v=1))


def legacy_open(session: str, owner: str = "", version: int = 2) -> Open:
    return Open(session=session, seq=0, owner=owner, image=np.ones(3, np.uint8), committed=np.zeros(0, np.int32),
                version=version)


def test_a_v3_open_names_the_session_its_owner_certifies():
    owner = new_owner()
    sid = session_id_for(owner)
    assert derived_form(sid) and certifies(owner, sid) and not certifies(owner + "x", sid)
    assert session_id_for(owner) == sid != session_id_for(new_owner())          # stable, and one per owner
    assert decode(encode(Open(session=sid, seq=0, owner=owner, image=np.ones(3, np.uint8),
                              committed=np.zeros(0, np.int32)))).session == sid
    refusals = {
        "another owner's id": with_header(encode(EXAMPLES[0]), owner="p" * 16),
        "a chosen id": with_header(encode(EXAMPLES[0]), session="victim"),
        "no owner (v3: the device brings it)": with_header(encode(EXAMPLES[0]), owner=""),
        # A v1/v2 device may choose any id, but not one of the derived form it cannot prove.
        "legacy open of a derived id": with_header(encode(EXAMPLES[0]), v=2, owner="p" * 16),
        "legacy open of a derived id, edge-issued owner": with_header(encode(EXAMPLES[0]), v=1, owner=""),
    }
    for name, frames in refusals.items():
        with pytest.raises(ProtocolError) as info:
            decode(frames)
        assert info.value.code == "bad_field", name
        assert "owner" in info.value.message, name
    # Older devices are served as before: their ids (16 hex digits) are not of the derived form.
    for version in (1, 2):
        legacy = decode(encode(legacy_open("0123456789abcdef", version=version)))
        assert (legacy.version, legacy.owner) == (version, "")
    assert decode(encode(legacy_open(SID, OWNER))).session == SID          # a legacy open may prove it too


STRICT = {   # every header field takes exactly its JSON type: an int is not 1.0 or true
    "v": [1.0, 2.0, 3.0, True, "3", None], "seq": [1.0, True, "1", None, [1]], "start": [0.0, False, "0"],
    "assumed": [-1.0], "session": [5, None, True, ["s"]], "owner": [1.0, None, 16],
    "type": [1, None, ["verify"]], "arrays": [{}, "tokens", 1],
}


@pytest.mark.parametrize("field", sorted(STRICT))
def test_every_header_field_is_strictly_typed(field):
    frames = encode(Verify(session="s", seq=1, owner=OWNER, start=0, tokens=np.array([1], np.int32)))
    for value in STRICT[field]:
        with pytest.raises(ProtocolError) as info:
            decode(with_header(frames, **{field: value}))
        assert info.value.code in ("bad_version", "bad_field", "unknown_type", "bad_array"), (field, value)


def test_opens_and_results_are_strictly_typed_too():
    strict = {"max_new_tokens": [16.0, True], "top_k": [0.0, False], "seed": [5.0], "done": [0, 1, "true", None],
              "prompt": [1, None], "temperature": ["0.5", True, None]}
    frames_of = {"done": encode(Result(session="s", seq=1, start=0, accepted=1, token=3))}
    for field, values in strict.items():
        for value in values:
            with pytest.raises(ProtocolError, match="bad_field"):
                decode(with_header(frames_of.get(field, encode(EXAMPLES[0])), **{field: value}))
    # JSON has one number type: a float field takes an integer (many encoders write 1.0 as 1).
    assert decode(with_header(encode(EXAMPLES[0]), temperature=1, top_p=1)).top_p == 1.0


def test_strings_that_utf8_cannot_encode_are_refused_with_bad_field():
    """A lone surrogate survives JSON but not UTF-8; it is refused at decode, in every string
    field, with a reply a strict device can decode (the message stays ASCII)."""
    verify = encode(Verify(session="s", seq=1, owner=OWNER, start=0, tokens=np.array([1], np.int32)))
    cases = [with_header(verify, owner="\ud800" * 16), with_header(verify, session="\udfff"),
             with_header(encode(EXAMPLES[0]), prompt="a\ud800b"), with_header(encode(EXAMPLES[0]), mode="\ud800")]
    for frames in cases:
        with pytest.raises(ProtocolError) as info:
            decode(frames)
        assert info.value.code == "bad_field" and "surrogate" in info.value.message
        decode(encode(Error(session="", seq=0, code=info.value.code, message=info.value.message)))
    with pytest.raises(ProtocolError) as info:
        decode(with_header(verify, type="\ud800"))
    assert info.value.code == "unknown_type" and info.value.message.isascii()


def test_fields_a_request_does_not_have_are_refused_and_a_reply_may_add_some():
    ping = encode(Ping(session="s", seq=1))
    for frames, field in [(with_header(good_verify_frames(), temprature=0.7), "temprature"),
                          (with_header(ping, x=1), "x")]:
        with pytest.raises(ProtocolError, match=f"bad_field.*{field}"):
            decode(frames)
    # A newer edge may add counters to a reply; an older device reads the rest.
    pong = decode(with_header(encode(Pong(session="s", seq=1, forwards=3)), counted_later=7))
    assert pong.forwards == 3
    bad_spec = with_header(good_verify_frames(), arrays=[{"name": "tokens", "dtype": "int32", "shape": [2],
                                                          "order": "F"}])
    with pytest.raises(ProtocolError, match="bad_array"):
        decode(bad_spec)


def test_arrays_travel_raw_little_endian():
    frames = encode(Verify(session="s", seq=0, start=0, tokens=np.array([1, 256], np.int32)))
    assert frames[1] == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def good_verify_frames():
    return encode(Verify(session="s", seq=1, start=0, tokens=np.array([1, 2], np.int32)))


def with_header(frames, **changes):
    header = json.loads(frames[0])
    for key, value in changes.items():
        if value is KeyError:
            header.pop(key)
        else:
            header[key] = value
    return [json.dumps(header).encode()] + frames[1:]


MALFORMED = {
    "not json": ([b"{not json"], "bad_json"),
    "not utf8": ([b"\xff\xfe"], "bad_json"),
    "json list": ([b"[1, 2]"], "bad_json"),
    "no frames": ([], "missing_frames"),
    "wrong version": (with_header(good_verify_frames(), v=5), "bad_version"),
    "float version": (with_header(good_verify_frames(), v=2.0), "bad_version"),
    "boolean version": (with_header(good_verify_frames(), v=True), "bad_version"),
    "unknown type": (with_header(good_verify_frames(), type="explode"), "unknown_type"),
    "missing seq": (with_header(good_verify_frames(), seq=KeyError), "missing_field"),
    "missing start": (with_header(good_verify_frames(), start=KeyError), "missing_field"),
    "string seq": (with_header(good_verify_frames(), seq="1"), "bad_field"),
    "bool start": (with_header(good_verify_frames(), start=True), "bad_field"),
    "long session": (with_header(good_verify_frames(), session="x" * 100), "bad_field"),
    "missing array": (with_header(good_verify_frames()[:1], arrays=[]), "missing_field"),
    "wrong dtype": (with_header(good_verify_frames(),
                                arrays=[{"name": "tokens", "dtype": "int64", "shape": [1]}]), "bad_array"),
    "shape vs bytes": (with_header(good_verify_frames(),
                                   arrays=[{"name": "tokens", "dtype": "int32", "shape": [3]}]), "bad_array"),
    "negative shape": (with_header(good_verify_frames(),
                                   arrays=[{"name": "tokens", "dtype": "int32", "shape": [-2]}]), "bad_array"),
    "wrong rank": (with_header(good_verify_frames(),
                               arrays=[{"name": "tokens", "dtype": "int32", "shape": [1, 2]}]), "bad_array"),
    "unknown array": (with_header(good_verify_frames(),
                                  arrays=[{"name": "secret", "dtype": "int32", "shape": [2]}]), "bad_array"),
    "huge declared shape": (with_header(good_verify_frames(),
                                        arrays=[{"name": "tokens", "dtype": "int32", "shape": [1 << 40]}]),
                            "too_large"),
    "extra frame": (good_verify_frames() + [b"\x00" * 4], "extra_frames"),
    "missing frame": (good_verify_frames()[:1], "missing_frames"),
    "empty chunk": (with_header([good_verify_frames()[0], b""],
                                arrays=[{"name": "tokens", "dtype": "int32", "shape": [0]}]), "bad_field"),
    "q without probs": (with_header(good_verify_frames() + [b"\x00" * 8],
                                    arrays=[{"name": "tokens", "dtype": "int32", "shape": [2]},
                                            {"name": "q_ids", "dtype": "int32", "shape": [2, 1]}]),
                        "bad_field"),
    "bad top_p": (with_header(encode(EXAMPLES[0]), top_p=1.5), "bad_field"),
    # An independent probe found these got no reply at all (issue 21, items 1-7 and 11).
    "deeply nested header": ([b'{"v":1,"type":"ping","session":"","seq":0,"x":' + b"[" * 30000 + b"]" * 30000
                              + b"}"], "bad_json"),
    "5000-digit seq": ([b'{"v":1,"type":"ping","session":"","seq":' + b"9" * 5000 + b',"arrays":[]}'],
                       "bad_json"),
    "seq beyond 64 bits": (with_header(good_verify_frames(), seq=2 ** 64), "bad_field"),
    "list type": (with_header(good_verify_frames(), type=["ping"]), "unknown_type"),
    "object type": (with_header(good_verify_frames(), type={"a": 1}), "unknown_type"),
    "shape product overflows int64": (with_header([encode(EXAMPLES[3])[0], b"\x00" * 8, b"", b"\x00" * 4], arrays=[
        {"name": "tokens", "dtype": "int32", "shape": [2]},
        {"name": "q_ids", "dtype": "int32", "shape": [2 ** 32, 2 ** 32]},
        {"name": "q_probs", "dtype": "float16", "shape": [2, 1]}]), "too_large"),
    # Found by `covspec bench reliability`: an empty array may not name a dimension numpy refuses.
    "empty array with a dimension beyond int64": (with_header(
        [encode(EXAMPLES[3])[0], b"\x00" * 8, b"", b""], arrays=[
            {"name": "tokens", "dtype": "int32", "shape": [2]},
            {"name": "q_ids", "dtype": "int32", "shape": [0, 2 ** 64]},
            {"name": "q_probs", "dtype": "float16", "shape": [0, 2 ** 63 - 1]}]), "too_large"),
    "shape beyond int64": (with_header(good_verify_frames(),
                                       arrays=[{"name": "tokens", "dtype": "int32", "shape": [2 ** 64]}]),
                           "too_large"),
    "temperature beyond float": (with_header(encode(EXAMPLES[0]), temperature=10 ** 400), "bad_field"),
    "temperature infinite": ([encode(EXAMPLES[0])[0].replace(b'"temperature":0.7', b'"temperature":Infinity')]
                             + encode(EXAMPLES[0])[1:], "bad_field"),
    "temperature NaN": ([encode(EXAMPLES[0])[0].replace(b'"temperature":0.7', b'"temperature":NaN')]
                        + encode(EXAMPLES[0])[1:], "bad_field"),
    "temperature denormal": (with_header(encode(EXAMPLES[0]), temperature=1e-320), "bad_field"),
    "temperature huge": (with_header(encode(EXAMPLES[0]), temperature=1e308), "bad_field"),
    "top_k beyond 64 bits": (with_header(encode(EXAMPLES[0]), top_k=10 ** 20), "bad_field"),
    "negative seed": (with_header(encode(EXAMPLES[0]), seed=-1), "bad_field"),
    "seed beyond 64 bits": (with_header(encode(EXAMPLES[0]), seed=2 ** 64), "bad_field"),
    "bad mode": (with_header(encode(EXAMPLES[0]), mode="draft_only"), "bad_field"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_messages_are_rejected_with_a_named_error(name):
    frames, code = MALFORMED[name]
    with pytest.raises(ProtocolError) as info:
        decode(frames, Limits(max_array_bytes=1 << 20))
    assert info.value.code == code, info.value
    assert str(info.value)


def test_the_whole_unsigned_64_bit_seed_range_is_accepted():
    for seed in (0, 2 ** 63, 2 ** 64 - 1):
        assert decode(with_header(encode(EXAMPLES[0]), seed=seed)).seed == seed


def test_message_size_limit():
    frames = encode(EXAMPLES[0])
    with pytest.raises(ProtocolError, match="too_large"):
        decode(frames, Limits(max_message_bytes=64))


def test_mismatched_sparse_shapes_rejected():
    frames = encode(Verify(session="s", seq=1, start=0, tokens=np.array([1, 2], np.int32),
                           q_ids=np.zeros((2, 3), np.int32), q_probs=np.ones((2, 3), np.float16)))
    header = json.loads(frames[0])
    header["arrays"][1]["shape"] = [1, 6]
    with pytest.raises(ProtocolError, match="q_ids/q_probs"):
        decode([json.dumps(header).encode()] + frames[1:])
