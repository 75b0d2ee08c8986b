"""The vision-language step of image curation: each row's normalised image and a prompt go to a
VLM through Ray Data LLM's multimodal stage; the reply is JSON (a caption and quality scores),
constrained by structured outputs and checked against the schema.

Ray's multimodal stage cannot read s3:// URLs, so the image travels in the row as PNG bytes (the
fetch and decode stages produced them) and reaches the model as a data URL.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from prefect_rayllm.rayllm_stages.llm.steps import StepFailed, parse_json_reply

IMAGE_COLUMN = "image_png"
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


class ImageStep:
    """Caption and score one image: the request carries the image and the prompt; the reply, JSON
    checked against `json_schema`, is written to `row_json[output_column]`."""

    images = True

    def __init__(
        self,
        prompt: str,
        sampling: dict[str, Any],
        json_schema: dict[str, Any] | None = None,
        output_column: str = "vlm",
        name: str = "caption",
    ):
        self.name = name
        self.prompt = prompt
        self.json_schema = json_schema or DEFAULT_SCORE_SCHEMA
        self.sampling = {**sampling, "structured_outputs": {"json": json.dumps(self.json_schema)}}
        self.output_column = output_column

    def request(self, row: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        png = row.get(IMAGE_COLUMN)
        if not png:
            raise StepFailed(f"row has no image in {IMAGE_COLUMN!r}")
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(bytes(png))}},
            {"type": "text", "text": self.prompt},
        ]
        return [{"role": "user", "content": content}], self.sampling

    def record(self, row: dict[str, Any], text: str) -> dict[str, Any]:
        data = json.loads(row["row_json"])
        data[self.output_column] = parse_json_reply(text, self.json_schema)
        return {"row_json": json.dumps(data, ensure_ascii=False, default=str)}
