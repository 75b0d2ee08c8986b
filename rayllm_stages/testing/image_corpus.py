"""A small image corpus with known outcomes, for the reliability tests, the demo and the benchmark.

`build_corpus` writes good images (distinct ones, an exact and a near duplicate, and the awkward
but valid kinds: CMYK, 16-bit, animated, EXIF-rotated) and bad ones (zero bytes, truncated, text
named .jpg, SVG, a 30000x30000 PNG bomb that is tiny on disk), plus a JSONL manifest that also
lists a key that does not exist. It returns what each URI should end as, so tests can assert.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel

from prefect_rayllm.rayllm_stages.io.storage import Location

Outcome = Literal["kept", "fetch_error", "decode_error", "duplicate"]


class Expected(BaseModel):
    """What one corpus URI should end as."""

    outcome: Outcome
    reason: str = ""  # a substring of the error or dedup reason
    duplicate_of: str | None = None  # file name of the kept original
    upright_size: tuple[int, int] | None = None  # (width, height) after EXIF orientation


class Corpus(BaseModel):
    """The written corpus: its image folder, manifest and expected outcome per URI."""

    images_url: str
    manifest_url: str
    expected: dict[str, Expected]

    def uris(self, outcome: Outcome | None = None) -> list[str]:
        return sorted(u for u, e in self.expected.items() if outcome is None or e.outcome == outcome)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header declaring width x height greyscale pixels, with one compressed row of data.

    Under a kilobyte on disk; a decoder that trusts the header would allocate width*height bytes.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * width  # filter byte + one row
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(row, 9)) + png_chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pattern_image(kind: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Distinct synthetic pictures whose perceptual hashes are far apart."""
    width, height = size
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    if kind == "gradient":
        channels = [x * np.ones_like(y), y * np.ones_like(x), (1 - x) * y]
        return Image.fromarray((np.stack(channels, -1) * 255).astype(np.uint8), "RGB")
    if kind == "checker":
        cells = ((x * 6).astype(int) + (y * 4).astype(int)) % 2
        return Image.fromarray((np.stack([cells * 220, cells * 40 + 30, 255 - cells * 200], -1)).astype(np.uint8), "RGB")
    if kind == "rings":
        radius = np.hypot(x - 0.4, y - 0.6)
        value = (np.sin(radius * 30) * 0.5 + 0.5) * 255
        return Image.fromarray(np.stack([value, value * 0.6, 255 - value], -1).astype(np.uint8), "RGB")
    if kind == "shapes":
        image = Image.new("RGB", size, (240, 235, 220))
        draw = ImageDraw.Draw(image)
        rng = np.random.default_rng(seed)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            x1, y1 = x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            draw.ellipse((x0, y0, x1, y1), fill=color) if rng.random() < 0.5 else draw.rectangle((x0, y0, x1, y1), fill=color)
        return image
    if kind == "bars":
        value = ((y * 10).astype(int) % 2) * 200 * np.ones_like(x) + 30
        return Image.fromarray(np.stack([value, 255 - value, value * 0.3], -1).astype(np.uint8), "RGB")
    raise ValueError(f"unknown pattern kind {kind!r}")


def exif_rotated_jpeg() -> bytes:
    """Stored 300x200 (landscape) with EXIF orientation 6: viewers show it upright as 200x300."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(pattern_image("bars", (300, 200)), "JPEG", quality=90, exif=exif)


def animated_gif() -> bytes:
    frames = [pattern_image(kind, (120, 90)).convert("P") for kind in ("gradient", "checker", "rings")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def gray16_png() -> bytes:
    ramp = (np.linspace(0, 65535, 160)[None, :] * np.ones((100, 1))).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")  # Pillow writes a 16-bit greyscale PNG from I;16


def corpus_files() -> tuple[dict[str, bytes], dict[str, Expected]]:
    """(file name -> bytes, file name -> expected outcome). Names sort so originals precede copies."""
    shapes = encode(pattern_image("shapes", (320, 240), seed=1), "PNG")
    gradient = encode(pattern_image("gradient", (256, 256)), "PNG")
    near = encode(pattern_image("shapes", (320, 240), seed=1).resize((288, 216), Image.Resampling.BICUBIC), "JPEG", quality=85)
    full_png = encode(pattern_image("checker", (200, 150)), "PNG")
    files = {
        "a-shapes.png": shapes,
        "b-gradient.png": gradient,
        "c-checker.jpg": encode(pattern_image("checker", (400, 300)), "JPEG", quality=92),
        "d-rings.webp": encode(pattern_image("rings", (300, 300)), "WEBP", quality=90),
        "e-cmyk.jpg": encode(pattern_image("rings", (240, 180)).rotate(90, expand=True).convert("CMYK"), "JPEG"),
        "f-gray16.png": gray16_png(),
        "g-animated.gif": animated_gif(),
        "h-exif-rotated.jpg": exif_rotated_jpeg(),
        "m-bad-bomb.png": bomb_png(),
        "m-bad-text.jpg": b"this is a text file, not a JPEG\n",
        "m-bad-truncated.png": full_png[: len(full_png) // 2],
        "m-bad-vector.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "m-bad-zero.jpg": b"",
        "y-dup-exact.png": shapes,
        "y-dup-near.jpg": near,
    }
    expected = {
        "a-shapes.png": Expected(outcome="kept", upright_size=(320, 240)),
        "b-gradient.png": Expected(outcome="kept", upright_size=(256, 256)),
        "c-checker.jpg": Expected(outcome="kept", upright_size=(400, 300)),
        "d-rings.webp": Expected(outcome="kept", upright_size=(300, 300)),
        "e-cmyk.jpg": Expected(outcome="kept", upright_size=(180, 240)),
        "f-gray16.png": Expected(outcome="kept", upright_size=(160, 100)),
        "g-animated.gif": Expected(outcome="kept", upright_size=(120, 90)),
        "h-exif-rotated.jpg": Expected(outcome="kept", upright_size=(200, 300)),
        "m-bad-bomb.png": Expected(outcome="decode_error", reason="decompression bomb"),
        "m-bad-text.jpg": Expected(outcome="decode_error", reason="not a recognised image format"),
        "m-bad-truncated.png": Expected(outcome="decode_error", reason="cannot decode PNG"),
        "m-bad-vector.svg": Expected(outcome="decode_error", reason="not a recognised image format"),
        "m-bad-zero.jpg": Expected(outcome="decode_error", reason="empty file"),
        "y-dup-exact.png": Expected(outcome="duplicate", reason="exact duplicate", duplicate_of="a-shapes.png"),
        "y-dup-near.jpg": Expected(outcome="duplicate", reason="near duplicate", duplicate_of="a-shapes.png"),
    }
    return files, expected


MISSING_NAME = "x-missing.png"


def build_corpus(folder: str | Location, storage_options: dict[str, Any] | None = None) -> Corpus:
    """Write the corpus under `folder`: images in `<folder>/images/`, `<folder>/manifest.jsonl`.

    The manifest lists every image plus `images/x-missing.png`, which is never written. Expected
    outcomes are keyed by full URI (as the source lists them); `duplicate_of` is a full URI too.
    """
    root = folder if isinstance(folder, Location) else Location(folder, storage_options or {})
    images = root.child("images")
    files, by_name = corpus_files()
    for name, data in files.items():
        images.child(name).write_bytes(data)

    def uri(name: str) -> str:
        return images.fs.unstrip_protocol(images.child(name).path)

    expected = {
        uri(name): e.model_copy(update={"duplicate_of": uri(e.duplicate_of) if e.duplicate_of else None})
        for name, e in by_name.items()
    }
    expected[uri(MISSING_NAME)] = Expected(outcome="fetch_error", reason=MISSING_NAME)
    manifest = root.child("manifest.jsonl")
    manifest.write_text("".join(json.dumps({"uri": u}) + "\n" for u in sorted(expected)))
    return Corpus(images_url=images.url, manifest_url=manifest.url, expected=expected)
