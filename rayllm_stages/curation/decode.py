"""Decode stage (CPU): validate, normalise and fingerprint fetched image bytes with Pillow.

The model gets an upright RGB image no larger than `max_edge`, re-encoded as PNG or JPEG, so every
later stage sees one format whatever the source was (CMYK, 16-bit, palette, alpha, animation,
EXIF-rotated). Anything Pillow cannot read becomes an error row with the reason, never a crash.
"""

from __future__ import annotations

import base64
import hashlib
import io
import warnings
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field

from prefect_rayllm.rayllm_stages.config.base import StrictModel
from prefect_rayllm.rayllm_stages.curation.fetch import object_column

EXIF_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees
INT_COLUMNS = frozenset({"width", "height", "norm_width", "norm_height", "frames", "orientation", "byte_size"})

DECODE_COLUMNS = (
    "image",
    "image_mime",
    "width",
    "height",
    "norm_width",
    "norm_height",
    "format",
    "frames",
    "orientation",
    "byte_size",
    "sha256",
    "phash",
    "decode_error",
)


class DecodeConfig(StrictModel):
    """How images are checked and normalised for the model."""

    max_pixels: int = Field(50_000_000, ge=1, description="refuse images whose header declares more pixels (decompression bombs)")
    max_edge: int = Field(448, ge=8, description="longest edge of the normalised image (only shrinks)")
    output_format: Literal["PNG", "JPEG"] = "PNG"
    jpeg_quality: int = Field(90, ge=1, le=100)
    png_compress_level: int = Field(
        1, ge=0, le=9, description="low by default: the bytes only travel to the model, CPU matters more"
    )
    keep_original_bytes: bool = Field(False, description="keep the `image_bytes` column (memory heavy)")


class DecodeError(ValueError):
    """Bytes that are not a usable image; the message is the reason written to the error row."""


def dct_matrix(size: int) -> np.ndarray:
    """Orthonormal DCT-II basis: `C @ X @ C.T` is the 2-D DCT of a size x size block."""
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2.0 / size)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT32 = dct_matrix(32)


FLAT_PREFIX = "flat-"
# Below this grey-level standard deviation (of the 32x32 reduction, 0-255 scale) an image has no
# detail for pHash to describe: its bits come from rounding noise, so two flat images of different
# colours land a few bits apart by chance. Such an image gets a colour key instead of a pHash.
FLAT_MAX_STD = 2.0


def perceptual_hash(image: Image.Image) -> str:
    """64-bit DCT pHash as 16 hex digits, or `flat-RRGGBB` for an image without detail.

    The image is reduced to 32x32 grayscale; the 8x8 lowest DCT frequencies are compared with their
    median. Re-encoding and resizing barely move those frequencies, so near-duplicates land a few
    bits apart while different images differ in about half of the 64 bits. A flat image (grey
    standard deviation under `FLAT_MAX_STD`) gets its mean colour instead, so flat images are
    duplicates only of flat images of about the same colour (`dedup`).
    """
    small = image.convert("RGB").resize((32, 32), Image.Resampling.LANCZOS)
    gray = np.asarray(small.convert("L"), dtype=np.float64)
    if gray.std() < FLAT_MAX_STD:
        red, green, blue = (round(c) for c in np.asarray(small, dtype=np.float64).reshape(-1, 3).mean(axis=0))
        return f"{FLAT_PREFIX}{red:02x}{green:02x}{blue:02x}"
    low = (_DCT32 @ gray @ _DCT32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term only says how bright the image is
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def is_flat(phash: str) -> bool:
    return phash.startswith(FLAT_PREFIX)


def flat_colour(phash: str) -> tuple[int, int, int]:
    """The mean colour of a flat image's key (`flat-RRGGBB`)."""
    value = phash[len(FLAT_PREFIX) :]
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily and refuse bombs from the header, before any pixel is decoded."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; Pillow's warning at its 89 Mpx default is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb refused by Pillow: {exc}") from None
    except UnidentifiedImageError:
        raise DecodeError(f"not a recognised image format (first bytes {data[:8]!r})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            f"decompression bomb: header declares {width}x{height} = {width * height} pixels, over max_pixels {max_pixels}"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode: 16/32-bit grey rescaled (not clipped), alpha flattened onto white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own I;16 -> RGB clips at 255, which turns most 16-bit images white.
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        span = float(values.max() - values.min()) or 1.0
        image = Image.fromarray(((values - values.min()) / span * 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def encode(image: Image.Image, config: DecodeConfig) -> bytes:
    buffer = io.BytesIO()
    if config.output_format == "PNG":
        image.save(buffer, format="PNG", compress_level=config.png_compress_level)
    else:
        image.save(buffer, format="JPEG", quality=config.jpeg_quality)
    return buffer.getvalue()


def decode_image(data: bytes, config: DecodeConfig) -> dict[str, Any]:
    """The decode columns for one image's bytes; raises `DecodeError` with the reason.

    A JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8) that still covers `max_edge`
    (Pillow's `draft`): a 12 MP photo then costs a fraction of a full decode, and the reduced image
    is what gets converted, normalised and hashed. Width and height stay the original's.
    """
    image = open_checked(data, config.max_pixels)
    source_format = image.format or "unknown"
    frames = int(getattr(image, "n_frames", 1) or 1)
    try:
        image.seek(0)
        orientation = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
        original_size = image.size
        if image.format == "JPEG":
            image.draft(None, (config.max_edge, config.max_edge))
        image.load()
        upright = ImageOps.exif_transpose(image)
        rgb = to_rgb(upright)
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # Truncated or corrupt data surfaces here, when pixels are actually read.
        raise DecodeError(f"cannot decode {source_format} data: {exc}") from None
    width, height = original_size if orientation not in _SWAPS_AXES else original_size[::-1]
    normalised = rgb.copy()
    normalised.thumbnail((config.max_edge, config.max_edge), Image.Resampling.LANCZOS)
    return {
        "image": encode(normalised, config),
        "image_mime": f"image/{config.output_format.lower()}",
        "width": width,
        "height": height,
        "norm_width": normalised.width,
        "norm_height": normalised.height,
        "format": source_format,
        "frames": frames,
        "orientation": orientation,
        "byte_size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "phash": perceptual_hash(rgb),
        "decode_error": "",
    }


def empty_decode_row(data: bytes, error: str) -> dict[str, Any]:
    """Columns of a row that did not decode: same types as a good row, so Arrow blocks concat."""
    return {
        "image": b"",
        "image_mime": "",
        "width": 0,
        "height": 0,
        "norm_width": 0,
        "norm_height": 0,
        "format": "",
        "frames": 0,
        "orientation": 0,
        "byte_size": len(data),
        "sha256": hashlib.sha256(data).hexdigest() if data else "",
        "phash": "",
        "decode_error": error,
    }


class DecodeImages:
    """Ray Data batch UDF: `uri`, `image_bytes`, `fetch_error` in; the decode columns out.

    Output columns: `image` (normalised PNG/JPEG bytes, empty on error), `image_mime`, `width`,
    `height` (original size, upright after EXIF orientation), `norm_width`, `norm_height`
    (the normalised image), `format` (source format, e.g. JPEG), `frames`, `orientation` (EXIF tag,
    1 when absent), `byte_size`, `sha256` (of the fetched bytes), `phash` (16 hex digits, or `flat-RRGGBB`),
    `decode_error` ("" on success). Rows that failed to fetch pass through untouched apart from
    empty decode columns (their `decode_error` stays "": the fetch error is their reason).
    `image_bytes` is dropped unless `keep_original_bytes`; other columns pass through.
    """

    def __init__(self, config: DecodeConfig | dict[str, Any] | None = None) -> None:
        self.config = DecodeConfig.model_validate(config or {})

    def decode_row(self, uri: str, data: bytes, fetch_error: str) -> dict[str, Any]:
        if fetch_error:
            return empty_decode_row(b"", "")
        try:
            return decode_image(data, self.config)
        except DecodeError as exc:
            return empty_decode_row(data, f"{uri}: {exc}")
        except Exception as exc:
            return empty_decode_row(data, f"{uri}: unexpected {type(exc).__name__} while decoding: {exc}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = {"uri", "image_bytes"} - set(batch)
        if missing:
            raise KeyError(f"decode stage needs columns {sorted(missing)}; batch has {sorted(batch)}")
        size = len(batch["uri"])
        fetch_errors = batch.get("fetch_error", [""] * size)
        rows = [
            self.decode_row(str(batch["uri"][i]), bytes(batch["image_bytes"][i] or b""), str(fetch_errors[i] or ""))
            for i in range(size)
        ]
        dropped = set(DECODE_COLUMNS) | (set() if self.config.keep_original_bytes else {"image_bytes"})
        out = {k: v for k, v in batch.items() if k not in dropped}
        for column in DECODE_COLUMNS:
            values = [row[column] for row in rows]
            out[column] = np.array(values, dtype=np.int64) if column in INT_COLUMNS else object_column(values)
        return out


def data_url(image_bytes: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(image_bytes).decode('ascii')}"


def image_message(prompt_text: str, png_bytes: bytes, mime: str = "image/png") -> list[dict[str, Any]]:
    """OpenAI-style chat messages with the image as a data URL, the form Ray's
    PrepareMultimodalStage accepts (it refuses s3:// URLs and raw bytes)."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(png_bytes, mime)}},
                {"type": "text", "text": prompt_text},
            ],
        }
    ]
