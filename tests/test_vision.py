"""The VLM step of image curation on a real tiny vision-language model (CPU vLLM, Ray Data LLM's
multimodal stage): every image gets a schema-valid caption and score, and a row without an image
becomes an error that names the column."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app


def _png(index: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40 + 7 * index, 30 + 3 * index), (index * 20 % 255, 80, 160)).save(buffer, "PNG")
    return buffer.getvalue()


def test_tiny_vlm_folder_is_complete(tiny_vlm):
    names = {p.name for p in tiny_vlm.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    assert json.loads((tiny_vlm / "config.json").read_text())["architectures"] == ["Idefics3ForConditionalGeneration"]


@pytest.mark.slow
def test_images_get_schema_valid_captions_and_scores(ray_session, tiny_vlm):
    import ray

    from rayllm_stages.config import ModelSpec
    from rayllm_stages.engines import build_engine_processor, engine_error_of
    from rayllm_stages.vision import DEFAULT_SCORE_SCHEMA, IMAGE_COLUMN, ImageStep

    rows = [{"row_index": i, "row_key": f"img{i}", "row_json": json.dumps({"uri": f"s3://b/img{i}.png"}),
             "usage_json": "{}", IMAGE_COLUMN: _png(i)} for i in range(10)]
    rows.append({"row_index": 10, "row_key": "no-image", "row_json": "{}", "usage_json": "{}", IMAGE_COLUMN: b""})
    spec = ModelSpec(source=str(tiny_vlm), engine_kwargs={"max_model_len": 512, "dtype": "float32"}, batch_size=4)
    step = ImageStep("Describe the image and rate its quality.", {"temperature": 0.0, "max_tokens": 64, "top_k": -1, "stop": []})

    out = {r["row_key"]: r for r in build_engine_processor(spec, step)(ray.data.from_items(rows)).take_all()}

    assert len(out) == len(rows)
    assert "no image in 'image_png'" in engine_error_of(out["no-image"])
    import jsonschema

    for key in (f"img{i}" for i in range(10)):
        assert not engine_error_of(out[key]), engine_error_of(out[key])
        record = json.loads(out[key]["row_json"])
        jsonschema.validate(record["vlm"], DEFAULT_SCORE_SCHEMA)
        assert record["uri"] == f"s3://b/{key}.png"
        assert out[key]["num_input_tokens"] > 20  # the image's tokens reached the model, not just the text
