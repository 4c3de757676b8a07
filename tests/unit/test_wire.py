"""Refusal bodies between nodes (onionpost/core/wire.py): status, code and words survive the
trip."""

from __future__ import annotations

import json
from typing import Any

import pytest

from onionpost.core.crypto.primitives import SeededRandom
from onionpost.core.errors import (
    BadRequest,
    CodeRefused,
    DeliveryError,
    DeviceRefused,
    DiskFull,
    InviteChainRefused,
    MalformedData,
    MessageTooLarge,
    OnionpostError,
    PeerProtocolError,
    PermanentDeliveryError,
    ProofOfWorkError,
    QuotaExceeded,
    StaleRecipientKeys,
    TemporaryDeliveryError,
    TooManyCodeAttempts,
    UnknownMailbox,
)
from onionpost.core.wire import (
    MAX_JSON_BYTES,
    KeyUpdate,
    error_from_body,
    hex_field,
    int_field,
    parse_json,
    parse_request_json,
    refusal,
)
from tests.unit.crypto_world import make_user

# (error, HTTP status, body status, code)
REFUSALS: list[tuple[OnionpostError, int, str, str]] = [
    (DeviceRefused(), 403, "permanent", "5.7.8"),
    (UnknownMailbox(), 404, "permanent", "5.1.1"),
    (MessageTooLarge(), 413, "permanent", "5.3.4"),
    # a size refusal carried across the node boundary keeps its 413
    (PermanentDeliveryError.from_error(MessageTooLarge()), 413, "permanent", "5.3.4"),
    (QuotaExceeded(), 507, "temporary", "4.2.2"),
    # a full mailbox at delivery is wrapped (inbox.py); it is still 507, not a generic 503
    (TemporaryDeliveryError.from_error(QuotaExceeded()), 507, "temporary", "4.2.2"),
    # the inbox's disk nearly full: "Insufficient Storage" too, with its own code
    (TemporaryDeliveryError.from_error(DiskFull()), 507, "temporary", "4.3.1"),
    (TemporaryDeliveryError("busy", code="4.7.0"), 429, "temporary", "4.7.0"),
    (TooManyCodeAttempts(), 429, "temporary", "4.7.0"),
    (StaleRecipientKeys(), 503, "temporary", "4.7.5"),
    (TemporaryDeliveryError(), 503, "temporary", "4.4.0"),
    (PeerProtocolError(), 503, "temporary", "4.5.0"),
    (BadRequest(), 400, "permanent", "5.5.2"),
    (CodeRefused(), 400, "permanent", "5.7.0"),
    (InviteChainRefused(), 400, "permanent", "5.7.1"),
    (ProofOfWorkError(), 400, "permanent", "5.7.1"),
    (MalformedData("bad bytes"), 400, "permanent", "5.6.0"),
]


@pytest.mark.parametrize(("exc", "http", "status", "code"), REFUSALS)
def test_refusal(exc: OnionpostError, http: int, status: str, code: str) -> None:
    got_http, body = refusal(exc)
    assert got_http == http
    assert body["status"] == status and body["code"] == code
    assert body["message"] == str(exc)
    assert body["reason"] == getattr(exc, "reason", type(exc).__name__)
    json.dumps(body)  # it must be sendable as it is


@pytest.mark.parametrize(("exc", "http", "status", "code"), REFUSALS)
def test_refusals_round_trip(exc: OnionpostError, http: int, status: str, code: str) -> None:
    """What one node answers, the other reads back with the same meaning and words."""
    got_http, body = refusal(exc)
    back = error_from_body(got_http, json.dumps(body).encode())
    assert back.temporary == (status == "temporary")
    assert back.code == code
    assert str(back) == str(exc)


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# (http status, body, expected type, temporary, code)
FROM_BODY: list[tuple[int, bytes, type[OnionpostError], bool, str]] = [
    (503, b"", TemporaryDeliveryError, True, "4.4.0"),  # no body: the HTTP status decides
    (429, b"not json", TemporaryDeliveryError, True, "4.4.0"),
    (400, b"[1, 2]", PermanentDeliveryError, False, "5.0.0"),
    (502, _body(code="x.y.z", message=""), TemporaryDeliveryError, True, "4.4.0"),
    (400, _body(code="9.9.9"), PermanentDeliveryError, False, "5.0.0"),
    # the body's status wins over the HTTP status
    (400, _body(status="temporary", code="4.2.2"), TemporaryDeliveryError, True, "4.2.2"),
    (503, _body(status="permanent", code="5.7.1"), PermanentDeliveryError, False, "5.7.1"),
    # the first digit of the code follows the status, so nobody disagrees about retrying
    (503, _body(status="temporary", code="5.2.2"), TemporaryDeliveryError, True, "4.2.2"),
    (404, _body(status="permanent", code="5.1.1", reason="unknown-mailbox"), UnknownMailbox, False, "5.1.1"),  # noqa: E501
    # a 404 without the reason is any permanent refusal
    (404, _body(status="permanent", code="5.1.1"), PermanentDeliveryError, False, "5.1.1"),
    (503, _body(status="temporary", code="4.7.5", reason="stale-keys"), StaleRecipientKeys, True, "4.7.5"),  # noqa: E501
    (400, _body(status="permanent", reason="code-refused"), CodeRefused, False, "5.7.0"),
    (429, _body(status="temporary", reason="code-attempts"), TooManyCodeAttempts, True, "4.7.0"),
    (400, _body(status="permanent", reason="invite-chain"), InviteChainRefused, False, "5.7.1"),
]  # fmt: skip


@pytest.mark.parametrize(("http", "raw", "kind", "temporary", "code"), FROM_BODY)
def test_error_from_body(
    http: int, raw: bytes, kind: type[OnionpostError], temporary: bool, code: str
) -> None:
    err = error_from_body(http, raw)
    assert type(err) is kind
    assert err.temporary is temporary
    assert err.code == code
    assert str(err).strip()


def test_error_from_body_words() -> None:
    err = error_from_body(503, b"")
    assert str(err) == "The recipient's inbox answered HTTP 503 without an explanation."
    # a peer's words are folded onto one line and cut short
    long = error_from_body(400, _body(status="permanent", message="a\r\nb\t" + "x" * 900))
    assert str(long).startswith("a b x") and len(str(long)) == 500
    assert "\n" not in str(long)
    # a reason longer than 64 characters is dropped, a short one kept
    dropped = error_from_body(400, _body(status="permanent", reason="r" * 65))
    kept = error_from_body(400, _body(status="permanent", reason="token-rejected"))
    assert isinstance(dropped, DeliveryError) and dropped.reason == "refused"
    assert isinstance(kept, DeliveryError) and kept.reason == "token-rejected"
    not_text = error_from_body(400, _body(status="permanent", reason=7))
    assert isinstance(not_text, DeliveryError) and not_text.reason == "refused"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\xff\xfe", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # too deep
        (b'"a string"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b" " * (MAX_JSON_BYTES + 1), "larger than"),
    ],
)
def test_json_that_is_not_an_object_is_refused(raw: bytes, words: str) -> None:
    with pytest.raises(PeerProtocolError, match=words) as answer:
        parse_json(raw, "answer")
    assert answer.value.temporary  # a server's broken answer may be fixed by an upgrade
    with pytest.raises(BadRequest, match=words) as request:
        parse_request_json(raw)
    assert not request.value.temporary  # a client's broken request will never parse


def test_json_objects_parse() -> None:
    assert parse_json(b'{"a": 1}', "answer") == {"a": 1}
    assert parse_request_json(b" " * (MAX_JSON_BYTES - 2) + b"{}") == {}


HEX = [
    ({"k": "00ff"}, None, b"\x00\xff"),
    ({"k": ""}, None, b""),
    ({"k": "aa" * 32}, 32, b"\xaa" * 32),
]


@pytest.mark.parametrize(("data", "length", "value"), HEX)
def test_hex_field(data: dict[str, Any], length: int | None, value: bytes) -> None:
    assert hex_field(data, "k", length) == value


@pytest.mark.parametrize(
    ("data", "length"),
    [({}, None), ({"k": 5}, None), ({"k": "zz"}, None), ({"k": "abc"}, None), ({"k": "aa"}, 2)],
)
def test_bad_hex_field(data: dict[str, Any], length: int | None) -> None:
    with pytest.raises(MalformedData, match="'k' must be hex"):
        hex_field(data, "k", length)


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0, True), (5, True), (1 << 62, True), (-1, False), ((1 << 62) + 1, False), (True, False),
     (1.0, False), ("1", False), (None, False)],
)  # fmt: skip
def test_int_field(value: Any, ok: bool) -> None:
    if ok:
        assert int_field({"n": value}, "n") == value
    else:
        with pytest.raises(MalformedData, match="'n' must be a whole number"):
            int_field({"n": value}, "n")


def test_int_field_bounds() -> None:
    assert int_field({"n": 3}, "n", low=3, high=3) == 3
    with pytest.raises(MalformedData):
        int_field({"n": 4}, "n", low=3, high=3)


def test_key_update_round_trip_empty_and_full() -> None:
    empty = KeyUpdate()
    assert KeyUpdate.parse(empty.encode()) == empty
    user = make_user("alice", 2, SeededRandom(b"wire"), profile=True)
    full = KeyUpdate(
        device_list=user.device_list,
        binding=user.binding,
        profile=user.profile,
        prekeys=[d.signed_prekey() for d in user.devices],
    )
    raw = full.encode()
    assert raw.startswith(b"OPku")
    back = KeyUpdate.parse(raw)
    assert back.encode() == raw
    assert back.device_list == user.device_list and len(back.prekeys) == 2


@pytest.mark.parametrize(
    "raw", [b"", b"OPkx" + b"\x00" * 14, KeyUpdate().encode()[:-1], KeyUpdate().encode() + b"\x00"]
)
def test_bad_key_updates_are_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedData):
        KeyUpdate.parse(raw)
