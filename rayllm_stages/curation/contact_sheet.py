"""Contact sheet: a sample of kept and rejected images as one PNG, for a person to glance at.

    tiles = [Tile(uri, "kept", image_bytes=...), Tile(uri, "decode", reason="empty file (0 bytes)")]
    png = render_contact_sheet(kept_tiles, rejected_tiles)   # bytes of a PNG

Each tile is a thumbnail (`thumb` pixels on its longest edge) with the file name and, for a
rejected image, the stage and reason under it. An image without bytes (it failed to fetch or
decode, or could not be read again) becomes a placeholder tile that says why.

`contact_sheet(records, images, fetch)` does it for curation records: `sample_for_sheet` picks
half kept and half rejected images, their bytes are read again, and the sheet is rendered.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from prefect_rayllm.rayllm_stages.curation.fetch import FetchConfig, FetchImages
from prefect_rayllm.rayllm_stages.curation.funnel import reason_kind
from prefect_rayllm.rayllm_stages.curation.records import STAGES

BACKGROUND = (246, 246, 244)
INK = (40, 40, 40)
MUTED = (110, 110, 110)
KEPT_COLOUR = (36, 120, 60)
REJECTED_COLOUR = (170, 40, 40)
PLACEHOLDER = (222, 214, 214)


@dataclass
class Tile:
    """One image on the sheet: `image` is None for a placeholder."""

    uri: str
    stage: str  # "kept", or where it was rejected
    reason: str = ""
    image: Image.Image | None = None


def thumbnail(data: bytes, size: int) -> Image.Image:
    """An upright RGB thumbnail of image bytes (raises on bytes Pillow cannot read)."""
    from prefect_rayllm.rayllm_stages.curation.decode import DecodeConfig, decode_image

    decoded = decode_image(data, DecodeConfig(max_edge=size, output_format="PNG", max_pixels=100_000_000))
    return Image.open(io.BytesIO(decoded["image"])).convert("RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _tile_image(tile: Tile, thumb: int, caption_lines: int, font, small) -> Image.Image:
    line_height = 13
    width, height = thumb + 12, thumb + 12 + line_height * caption_lines
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    box = (6, 6, 6 + thumb, 6 + thumb)
    if tile.image is not None:
        image = tile.image.copy()
        image.thumbnail((thumb, thumb))
        canvas.paste(image, (6 + (thumb - image.width) // 2, 6 + (thumb - image.height) // 2))
    else:
        draw.rectangle(box, fill=PLACEHOLDER, outline=REJECTED_COLOUR)
        lines = textwrap.wrap(f"{tile.stage} error: {tile.reason}", width=max(8, thumb // 6))[:7]
        for i, line in enumerate(lines):
            draw.text((10, 10 + i * 12), line, fill=INK, font=small)
    name = tile.uri.rsplit("/", 1)[-1]
    texts = [name[: thumb // 6 + 2]]
    if tile.stage != "kept":
        texts += textwrap.wrap(f"{tile.stage}: {tile.reason}", width=max(8, thumb // 6 + 2))
    for i, text in enumerate(texts[:caption_lines]):
        colour = INK if i == 0 else REJECTED_COLOUR
        draw.text((6, thumb + 8 + i * line_height), text, fill=colour, font=font if i == 0 else small)
    return canvas


def render_contact_sheet(kept: list[Tile], rejected: list[Tile], thumb: int = 96, columns: int = 6) -> bytes:
    """A PNG with a "kept" section and a "rejected" section, `columns` tiles per row."""
    font, small, title = _font(11), _font(10), _font(14)
    caption_lines = 3
    tile_w, tile_h = thumb + 12, thumb + 12 + 13 * caption_lines
    sections = [("kept", kept, KEPT_COLOUR), ("rejected", rejected, REJECTED_COLOUR)]
    header = 24
    rows = [max(1, -(-len(tiles) // columns)) for _, tiles, _ in sections]
    width = columns * tile_w
    height = sum(header + r * tile_h for r in rows)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    top = 0
    for (name, tiles, colour), row_count in zip(sections, rows, strict=False):
        draw.text((6, top + 5), f"{name} ({len(tiles)} shown)", fill=colour, font=title)
        top += header
        if not tiles:
            draw.text((6, top + 6), "none", fill=MUTED, font=font)
        for index, tile in enumerate(tiles):
            x, y = (index % columns) * tile_w, top + (index // columns) * tile_h
            sheet.paste(_tile_image(tile, thumb, caption_lines, font, small), (x, y))
        top += row_count * tile_h
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def compact_for_markdown(png: bytes, max_bytes: int = 300_000) -> tuple[str, bytes]:
    """(mime, bytes) small enough to inline in a markdown artifact: the PNG itself when it is
    under `max_bytes`, else a JPEG of it (photos make large PNGs)."""
    if len(png) <= max_bytes:
        return "image/png", png
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="JPEG", quality=80, optimize=True)
    return "image/jpeg", buffer.getvalue()


def sample_for_sheet(records: Sequence[Mapping[str, Any]], images: int) -> tuple[list[Mapping], list[Mapping]]:
    """Up to `images` records, half kept (spread over URI order), half rejected (stages in turn)."""
    kept = sorted((r for r in records if not r["stage"]), key=lambda r: r["uri"])
    by_stage: dict[str, list[Mapping]] = {}
    for record in sorted((r for r in records if r["stage"]), key=lambda r: r["uri"]):
        by_stage.setdefault(record["stage"], []).append(record)
    rejected: list[Mapping] = []
    queues = [by_stage[s] for s in [*STAGES, *sorted(set(by_stage) - set(STAGES))] if s in by_stage]
    while queues and len(rejected) < images:
        for queue in list(queues):
            if queue:
                rejected.append(queue.pop(0))
            if not queue:
                queues.remove(queue)
    want_kept = min(len(kept), max(images // 2, images - len(rejected)))
    rejected = rejected[: images - want_kept]
    step = len(kept) / want_kept if want_kept else 1
    return [kept[int(i * step)] for i in range(want_kept)], rejected


def contact_sheet(
    records: Sequence[Mapping[str, Any]], images: int, fetch: FetchConfig, thumb: int = 96
) -> tuple[bytes, dict[str, list[str]]]:
    """A PNG of a sample of kept and rejected images, and the sampled URIs.

    The sample's bytes are read again (with the fetch stage's retries) rather than carried through
    the pipeline; an image that failed to fetch or decode gets a placeholder tile with its reason.
    """
    kept, rejected = sample_for_sheet(records, images)
    fetcher = FetchImages(fetch)

    def tile(record: Mapping[str, Any]) -> Tile:
        stage = record["stage"] or "kept"
        reason = reason_kind(stage, record["reason"]).split(": ", 1)[1] if record["stage"] else ""
        if stage in ("fetch", "decode"):  # no bytes to show: the tile says why, without the URI
            detail = record["reason"].removeprefix(f"{record['uri']}: ")
            return Tile(record["uri"], stage, detail)
        data, error, _ = fetcher.fetch_one(record["uri"])
        if error:
            return Tile(record["uri"], stage, f"{reason} (not readable for the sheet: {error})".strip())
        try:
            return Tile(record["uri"], stage, reason, thumbnail(data, thumb))
        except Exception as exc:
            return Tile(record["uri"], stage, f"{reason} (not decodable for the sheet: {exc})".strip())

    with ThreadPoolExecutor(8) as pool:
        kept_tiles, rejected_tiles = list(pool.map(tile, kept)), list(pool.map(tile, rejected))
    png = render_contact_sheet(kept_tiles, rejected_tiles, thumb=thumb)
    return png, {"kept": [r["uri"] for r in kept], "rejected": [r["uri"] for r in rejected]}
