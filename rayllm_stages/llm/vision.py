"""The vision-language step of image curation: each row's normalised image and a prompt go to a
VLM through Ray Data LLM's multimodal stage; the reply is JSON (a caption and quality scores),
constrained by structured outputs and checked against the schema.

Ray's multimodal stage cannot read s3:// URLs, so the image travels in the row as PNG bytes (the
fetch and decode stages produced them) and reaches the model as a data URL.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from prefect_rayllm.rayllm_stages.llm.rows import EngineSampling
from prefect_rayllm.rayllm_stages.llm.steps import ChatRequest, StepFailed, parse_json_reply

IMAGE_COLUMN = "image_png"
IMAGE_SCHEMA = pa.schema([pa.field(IMAGE_COLUMN, pa.binary(), False)])
"""The column an image step reads besides `rows.ROW_SCHEMA`: the image as PNG bytes."""
DEFAULT_SCORE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "minLength": 1, "maxLength": 32},
        "quality": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
    },
    "required": ["caption", "quality"],
}


def image_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@functools.lru_cache(maxsize=1)
def _placeholder_png() -> bytes:
    """A small grey image: what a failed row's placeholder request shows the model."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


class ImageStep:
    """Caption and score one image (an `LLMStep`): the request carries the image and the prompt;
    the reply, JSON checked against `json_schema`, is written to `row_json[output_column]`.

    Reads the row's `image_png` column besides the row contract's (`IMAGE_SCHEMA`)."""

    images = True

    def __init__(
        self,
        prompt: str,
        sampling: Any,
        json_schema: dict[str, Any] | None = None,
        output_column: str = "vlm",
        name: str = "caption",
    ):
        self.name = name
        self.prompt = prompt
        self.json_schema = json_schema or DEFAULT_SCORE_SCHEMA
        self.sampling = EngineSampling.coerce(sampling).with_json_schema(json.dumps(self.json_schema))
        self.output_column = output_column
        self.placeholder = self._request(_placeholder_png(), self.sampling.placeholder())

    def request(self, row: Mapping[str, Any]) -> ChatRequest:
        png = row.get(IMAGE_COLUMN)
        if not png:
            raise StepFailed(f"row has no image in {IMAGE_COLUMN!r}")
        return self._request(bytes(png), self.sampling)

    def _request(self, png: bytes, sampling: EngineSampling) -> ChatRequest:
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(png)}},
            {"type": "text", "text": self.prompt},
        ]
        return ChatRequest([{"role": "user", "content": content}], sampling)

    def record(self, row: Mapping[str, Any], text: str) -> str:
        data = json.loads(row["row_json"])
        data[self.output_column] = parse_json_reply(text, self.json_schema)
        return json.dumps(data, ensure_ascii=False, default=str)
