"""Avatars: the one module that decodes images (Pillow), so hostile files meet one place.

A profile's avatar travels to every contact's device, and a mail client may some day show
it, so onionpost never publishes the bytes a person picked: it decodes the file (PNG or
JPEG only, its pixel dimensions checked from the header *before* any pixel is decoded, so a
decompression bomb is refused without being expanded), copies only the pixels into a fresh
image (no EXIF, no ICC profile, no text chunks, no trailing data: nothing but pixels
survives), scales it down and encodes it again.  Whatever exploit the original carried in
its metadata or in a malformed chunk stays behind, and what is published is an image
Pillow itself wrote and read back.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from onionpost.core.crypto.keys import MAX_AVATAR_BYTES
from onionpost.core.errors import UsageError

#: The largest file accepted as input (the output is far smaller; see MAX_AVATAR_BYTES).
MAX_AVATAR_FILE = 10 * 1024 * 1024
#: Pixel dimensions of an input, checked from the header before decoding: a photo from a
#: phone or camera fits (up to 25 megapixels; a JPEG is decoded at a reduced scale anyway),
#: a bomb of 30000 x 30000 does not.  A PNG at the limit takes about 100 MB to decode.
MAX_SOURCE_SIDE = 10_000
MAX_SOURCE_PIXELS = 25_000_000
#: The longest side of a published avatar (it is shown small, next to a name).
AVATAR_SIDE = 256
_SIDES = (AVATAR_SIDE, 192, 128, 96, 64)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
AVATAR_TYPES = ("image/png", "image/jpeg")

# Pillow refuses (raises) above this on its own as well; ours is checked first, with words.
Image.MAX_IMAGE_PIXELS = MAX_SOURCE_PIXELS


class AvatarError(UsageError):
    """The file cannot be used as an avatar."""


def process_avatar(data: bytes) -> tuple[str, bytes]:
    """The avatar to publish for the image file ``data``: ``(media type, bytes)``.

    PNG or JPEG in; a fresh PNG (when the picture has transparency) or JPEG out, at most
    :data:`AVATAR_SIDE` pixels on its longest side and :data:`MAX_AVATAR_BYTES` long.
    Raises :class:`AvatarError` with a sentence for a person for anything else.
    """
    if not data:
        raise AvatarError("The avatar file is empty.")
    if len(data) > MAX_AVATAR_FILE:
        raise AvatarError(
            f"The avatar file is {len(data)} bytes; at most {MAX_AVATAR_FILE // (1024 * 1024)} "
            "MiB is accepted (it is scaled down to a small picture anyway)."
        )
    if data.startswith(PNG_MAGIC):
        kind = "PNG"
    elif data.startswith(JPEG_MAGIC):
        kind = "JPEG"
    else:
        raise AvatarError("The avatar must be a PNG or JPEG image; this file is neither.")
    pixels = _decode(data, kind)
    has_alpha = pixels.mode in ("RGBA", "LA") or (
        pixels.mode == "P" and "transparency" in pixels.info
    )
    fresh = _pixels_only(pixels, "RGBA" if has_alpha else "RGB")
    for side in _SIDES:
        small = fresh.copy()
        small.thumbnail((side, side), Image.Resampling.LANCZOS)
        for quality in (85, 70, 50) if not has_alpha else (0,):
            out = _encode(small, has_alpha, quality)
            if len(out) <= MAX_AVATAR_BYTES:
                media = "image/png" if has_alpha else "image/jpeg"
                check_avatar(media, out)
                return media, out
    raise AvatarError(
        f"The avatar does not fit in {MAX_AVATAR_BYTES // 1024} KiB even at 64 x 64 pixels."
    )


def check_avatar(media_type: str, data: bytes) -> tuple[int, int]:
    """Decode an avatar as published (ours, or a contact's) and return its size in pixels;
    raises :class:`AvatarError` unless it is a sound PNG or JPEG of the kind it claims,
    within the published bounds."""
    if media_type not in AVATAR_TYPES:
        raise AvatarError(f"An avatar must be image/png or image/jpeg, not {media_type!r}.")
    if len(data) > MAX_AVATAR_BYTES:
        raise AvatarError(f"An avatar is at most {MAX_AVATAR_BYTES} bytes.")
    kind = "PNG" if media_type == "image/png" else "JPEG"
    if not data.startswith(PNG_MAGIC if kind == "PNG" else JPEG_MAGIC):
        raise AvatarError(f"The avatar is not the {kind} image it claims to be.")
    img = _decode(data, kind)
    if max(img.size) > AVATAR_SIDE:
        raise AvatarError(f"An avatar is at most {AVATAR_SIDE} pixels on its longest side.")
    return img.size


def _decode(data: bytes, kind: str) -> Image.Image:
    """Open ``data`` as exactly ``kind``, check its dimensions from the header, then decode
    every pixel (a truncated or damaged file fails here, not later)."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between MAX_IMAGE_PIXELS and twice that: an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[kind])
            width, height = img.size
            if (
                width < 1
                or height < 1
                or max(width, height) > MAX_SOURCE_SIDE
                or width * height > MAX_SOURCE_PIXELS
            ):
                raise AvatarError(
                    f"The image is {width} x {height} pixels; at most {MAX_SOURCE_SIDE} on a side "
                    f"and {MAX_SOURCE_PIXELS // 1_000_000} megapixels are accepted."
                )
            if kind == "JPEG":
                # Decode at 1/2 .. 1/8 scale straight from the DCT: a large photo never
                # becomes a full-size bitmap in memory.
                img.draft("RGB", (AVATAR_SIDE * 2, AVATAR_SIDE * 2))
            img.load()
    except AvatarError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise AvatarError("The image claims too many pixels to be decoded safely.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise AvatarError(f"The {kind} image is damaged or truncated: {exc}") from exc
    return img


def _pixels_only(img: Image.Image, mode: str) -> Image.Image:
    """A new image holding nothing of ``img`` but its pixels (no metadata of any kind)."""
    converted = img.convert(mode)
    return Image.frombytes(mode, converted.size, converted.tobytes())


def _encode(img: Image.Image, png: bool, quality: int) -> bytes:
    out = io.BytesIO()
    if png:
        img.save(out, format="PNG", optimize=True)
    else:
        img.save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()
