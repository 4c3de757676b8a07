"""Profiles: avatars re-encoded safely, profiles signed and verified, the verified name on From."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import replace
from email import message_from_bytes
from email.policy import default

import pytest
from PIL import Image

from onionpost.core.account import check_display_name, create_identity, sign_profile
from onionpost.core.address import Address
from onionpost.core.crypto.keys import MAX_AVATAR_BYTES, Profile, shown_name
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public
from onionpost.core.errors import BadSignature, UsageError
from onionpost.core.normalize import normalize
from onionpost.device.avatar import (
    AVATAR_SIDE,
    MAX_AVATAR_FILE,
    AvatarError,
    check_avatar,
    process_avatar,
)
from onionpost.device.sync import _Sender, _stamp

NOW = 1_700_000_000


def png(width: int, height: int, mode: str = "RGB", **save: object) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((width, height), 64).convert(mode).save(out, "PNG", **save)
    return out.getvalue()


def jpeg(width: int, height: int, **save: object) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((width, height), 64).convert("RGB").save(out, "JPEG", **save)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape:
    the pixel data would be inflated to that size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


# -- avatars ---------------------------------------------------------------------------------


def test_a_photo_is_scaled_and_re_encoded_without_its_metadata() -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x8825] = {2: (51.0, 30.0, 0.0)}  # GPS
    src = jpeg(1600, 1200, exif=exif.tobytes(), comment=b"<script>alert(1)</script>")
    media, out = process_avatar(src)
    assert media == "image/jpeg"
    assert len(out) <= MAX_AVATAR_BYTES
    assert b"SecretCam" not in out and b"Exif" not in out and b"script" not in out
    img = Image.open(io.BytesIO(out))
    assert img.format == "JPEG" and max(img.size) == AVATAR_SIDE
    assert img.size == (256, 192)  # the aspect ratio is kept
    assert check_avatar(media, out) == (256, 192)


def test_a_png_with_transparency_stays_png_and_loses_text_chunks_and_trailing_data() -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "<iframe src=evil>")
    src = png(100, 80, "RGBA", pnginfo=info) + b"<html>polyglot tail</html>"
    media, out = process_avatar(src)
    assert media == "image/png"
    assert b"iframe" not in out and b"polyglot" not in out and b"tEXt" not in out
    assert Image.open(io.BytesIO(out)).size == (100, 80)


def test_an_opaque_png_becomes_a_jpeg_small_enough() -> None:
    media, out = process_avatar(png(2000, 2000))
    assert media == "image/jpeg"
    assert len(out) <= MAX_AVATAR_BYTES


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"just some text, not a picture", "PNG or JPEG"),
        (b"GIF89a" + b"\x00" * 100, "PNG or JPEG"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "PNG or JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "damaged or truncated"),
    ],
)
def test_what_is_not_a_png_or_jpeg_is_refused_with_words(data: bytes, words: str) -> None:
    with pytest.raises(AvatarError) as err:
        process_avatar(data)
    assert words in str(err.value)


def test_a_truncated_image_is_refused() -> None:
    for whole in (png(300, 300), jpeg(300, 300)):
        with pytest.raises(AvatarError) as err:
            process_avatar(whole[: len(whole) // 2])
        assert "damaged or truncated" in str(err.value)


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = png_claiming(100_000, 100_000)
    assert len(bomb) < 200  # nothing big ever reaches the decoder
    with pytest.raises(AvatarError) as err:
        process_avatar(bomb)
    assert "pixels" in str(err.value)  # Pillow's own check or ours, whichever comes first
    with pytest.raises(AvatarError) as err:
        process_avatar(png_claiming(6_000, 5_000))  # each side fits, the area does not
    assert "pixels" in str(err.value)
    with pytest.raises(AvatarError) as err:
        process_avatar(png_claiming(11_000, 100))  # a small area, a side too long
    assert "11000 x 100 pixels" in str(err.value)


def test_a_file_too_large_is_refused_before_decoding() -> None:
    with pytest.raises(AvatarError) as err:
        process_avatar(b"\xff\xd8\xff" + b"\x00" * MAX_AVATAR_FILE)
    assert "MiB" in str(err.value)


def test_check_avatar_refuses_a_type_that_lies() -> None:
    _, out = process_avatar(jpeg(50, 50))
    with pytest.raises(AvatarError):
        check_avatar("image/png", out)
    with pytest.raises(AvatarError):
        check_avatar("image/svg+xml", out)


# -- profiles --------------------------------------------------------------------------------


def _account(seed: bytes = b"alice profile"):  # type: ignore[no-untyped-def]
    rng = SeededRandom(seed)
    return create_identity(
        "alice",
        "laptop",
        onion_pk=ed25519_public(rng(32)),
        sek_id=1,
        sek_pk=rng(32),
        now=NOW,
        rng=rng,
    )


def test_a_signed_profile_and_its_card_verify_for_the_identity_only() -> None:
    alice, mallory = _account(), _account(b"mallory")
    media, picture = process_avatar(jpeg(64, 64))
    profile, card = sign_profile(
        alice, display_name="Alice Liddell", avatar_type=media, avatar=picture, now=NOW
    )
    for p in (profile, card):
        Profile.parse(p.encode()).verify_for(alice.uik_pk)
        with pytest.raises(BadSignature):
            p.verify_for(mallory.uik_pk)
    assert card.avatar == b"" and card.display_name == "Alice Liddell"
    assert card.issued_at == profile.issued_at
    # a profile mallory signs, naming alice's key, does not verify
    forged = Profile(alice.uik_pk, NOW + 5, "Your Bank").signed(mallory.identity.uik_seed)
    with pytest.raises(BadSignature):
        forged.verify_for(alice.uik_pk)
    # mallory's own valid profile is still not alice's
    own = Profile(mallory.uik_pk, NOW, "Alice Liddell").signed(mallory.identity.uik_seed)
    with pytest.raises(BadSignature, match="different identity"):
        own.verify_for(alice.uik_pk)


def test_a_new_profile_is_always_newer_than_the_published_one() -> None:
    alice = _account()
    first, _ = sign_profile(alice, display_name="A", avatar_type="", avatar=b"", now=NOW + 100)
    # this device's clock is behind the one that published ``first``
    second, _ = sign_profile(
        alice, display_name="B", avatar_type="", avatar=b"", now=NOW, previous=first
    )
    assert second.issued_at == first.issued_at + 1


def test_a_device_without_the_identity_key_cannot_sign() -> None:
    alice = replace(_account(), identity=None)
    with pytest.raises(UsageError, match="identity key"):
        sign_profile(alice, display_name="A", avatar_type="", avatar=b"", now=NOW)


@pytest.mark.parametrize(
    "name",
    ["", "   ", "two\nlines", "tab\there", "evil\u202eknab", "x" * 65, "é" * 33],
)
def test_bad_display_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError):
        check_display_name(name)


def test_good_display_names() -> None:
    assert check_display_name("  Alice Liddell ") == "Alice Liddell"
    assert check_display_name("Ünïcødé 名前") == "Ünïcødé 名前"


def test_shown_name_removes_what_could_reorder_or_hide_text() -> None:
    assert shown_name("Bob\u202e moc.knab\u202c") == "Bob moc.knab"
    assert shown_name("a\x00b\x1b[31mc") == "a b [31mc"
    assert shown_name("  spaced   out ") == "spaced out"


# -- the verified name on filed mail ---------------------------------------------------------

ALICE = Address.for_key("alice", ed25519_public(b"\x01" * 32))


def _from(raw_from: bytes, verified_name: str) -> tuple[str, object]:
    raw = raw_from + b"\r\nSubject: x\r\n\r\nbody\r\n"
    msg = message_from_bytes(
        normalize(_stamp(raw, _Sender(ALICE, b"\x02" * 32, verified_name)), now=NOW),
        policy=default,
    )
    return str(msg["From"].addresses[0].display_name), msg["X-Onionpost-Verified-Name"]


def test_the_verified_name_replaces_a_missing_or_matching_display_name() -> None:
    me = str(ALICE).encode()
    assert _from(b"From: " + me, "Alice Liddell") == ("Alice Liddell", "Alice Liddell")
    assert _from(b"From: alice  LIDDELL <" + me + b">", "Alice Liddell")[0] == "Alice Liddell"


def test_a_different_claimed_name_is_marked_and_the_verified_name_comes_first() -> None:
    me = str(ALICE).encode()
    shown, header = _from(b"From: Your Bank <" + me + b">", "Alice Liddell")
    assert shown == "Alice Liddell (unverified: Your Bank)"
    assert header == "Alice Liddell"
    # encoded words are read as the person would see them
    shown, _ = _from(b"From: =?utf-8?q?J=C3=BCrgen?= <" + me + b">", "Alice Liddell")
    assert shown == "Alice Liddell (unverified: Jürgen)"


def test_without_a_verified_name_nothing_is_claimed_and_forged_headers_go() -> None:
    me = str(ALICE).encode()
    raw = b"X-Onionpost-Verified-Name: Your Bank\r\nFrom: Alice <" + me + b">"
    assert _from(raw, "") == ("Alice", None)
