"""Decode: JPEGs decoded reduced (draft) with the original size and orientation kept and the pHash
stable; flat images get a colour key, so a solid green is not a near duplicate of a solid purple."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from prefect_rayllm.rayllm_stages.curation.decode import DecodeConfig, decode_image, hamming, is_flat, perceptual_hash
from prefect_rayllm.rayllm_stages.curation.dedup import dedup

EXIF_ORIENTATION_TAG = 0x0112


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image: random detail at several scales (energy falling with frequency, as in
    natural images), so its low DCT frequencies are well apart from their median."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3))
    for cells, weight in ((4, 1.0), (12, 0.5), (48, 0.25), (160, 0.12)):
        coarse = Image.fromarray(rng.integers(0, 256, (cells * 3 // 4 or 1, cells, 3), dtype=np.uint8), "RGB")
        pixels += weight * np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    pixels = pixels / 1.87 + rng.normal(0, 2, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[EXIF_ORIENTATION_TAG] = orientation
    image.save(buffer, format="JPEG", quality=92, exif=exif)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_large_jpeg_is_decoded_reduced_with_its_size_and_a_stable_phash():
    image = photo(4000, 3000)
    data = jpeg(image)
    config = DecodeConfig(max_edge=448)
    row = decode_image(data, config)
    assert (row["width"], row["height"]) == (4000, 3000)
    assert max(row["norm_width"], row["norm_height"]) == 448
    full = perceptual_hash(Image.open(io.BytesIO(data)).convert("RGB"))
    assert hamming(row["phash"], full) <= 2


def test_exif_rotation_is_applied_to_size_and_pixels():
    image = photo(1200, 600)
    upright = decode_image(jpeg(image), DecodeConfig(max_edge=256))
    rotated = decode_image(jpeg(image, orientation=6), DecodeConfig(max_edge=256))
    assert (upright["width"], upright["height"]) == (1200, 600)
    assert (rotated["width"], rotated["height"], rotated["orientation"]) == (600, 1200, 6)
    assert (rotated["norm_width"], rotated["norm_height"]) == (128, 256)


def test_flat_images_are_duplicates_only_of_the_same_colour():
    green, purple = Image.new("RGB", (64, 64), (40, 200, 60)), Image.new("RGB", (64, 64), (130, 40, 160))
    rows = {
        "s3://b/1-green.png": decode_image(png(green), DecodeConfig()),
        "s3://b/2-purple.png": decode_image(png(purple), DecodeConfig()),
        "s3://b/3-green.jpg": decode_image(jpeg(green), DecodeConfig()),
        "s3://b/4-photo.png": decode_image(png(photo(64, 64)), DecodeConfig()),
    }
    assert all(is_flat(rows[uri]["phash"]) for uri in list(rows)[:3])
    assert not is_flat(rows["s3://b/4-photo.png"]["phash"])
    result = dedup([{"uri": uri, **row} for uri, row in rows.items()], max_distance=6)
    assert result.kept == ["s3://b/1-green.png", "s3://b/2-purple.png", "s3://b/4-photo.png"]
    reason = result.dropped["s3://b/3-green.jpg"]
    assert reason.startswith("near duplicate of s3://b/1-green.png (both flat images, colours #")
    assert "pHash is not compared where an image has no detail" in reason
