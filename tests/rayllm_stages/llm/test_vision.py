"""The VLM step of image curation on a real tiny vision-language model (CPU vLLM, Ray Data LLM's
multimodal stage): every image gets a schema-valid caption and score, and a row without an image
becomes an error that names the column."""

from __future__ import annotations

import io
import json

import pytest


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
    """The caption stage over a list of rows (decoded here): every image gets a schema-valid
    caption and score; rows that failed earlier keep their stage and reason; a row without an
    image fails in the caption step with a reason naming the column."""
    import jsonschema

    from prefect_rayllm.rayllm_stages.config.models import ModelSpec, SamplingParams
    from prefect_rayllm.rayllm_stages.curation.stages import caption_stage, decode_stage
    from prefect_rayllm.rayllm_stages.llm.vision import DEFAULT_SCORE_SCHEMA

    fetched = [{"uri": f"s3://b/img{i}.png", "image_bytes": _png(i), "fetch_error": "", "fetch_attempts": 1} for i in range(10)]
    fetched.append({"uri": "s3://b/broken.png", "image_bytes": b"not an image", "fetch_error": "", "fetch_attempts": 1})
    fetched.append(
        {
            "uri": "s3://b/gone.png",
            "image_bytes": b"",
            "fetch_error": "s3://b/gone.png: FileNotFoundError: gone",
            "fetch_attempts": 1,
        }
    )
    decoded = decode_stage(fetched)
    decoded.append({**decoded[0], "uri": "s3://b/no-image", "image": b""})
    spec = ModelSpec(source=str(tiny_vlm), engine_kwargs={"max_model_len": 512, "dtype": "float32"}, batch_size=4)

    records = caption_stage(decoded, spec, "Describe the image and rate its quality.", sampling=SamplingParams(max_tokens=64))

    assert [r["uri"] for r in records] == [r["uri"] for r in decoded]  # one record per row, in order
    out = {r["uri"]: r for r in records}
    assert out["s3://b/gone.png"]["stage"] == "fetch" and "FileNotFoundError" in out["s3://b/gone.png"]["reason"]
    assert out["s3://b/broken.png"]["stage"] == "decode" and "not a recognised image format" in out["s3://b/broken.png"]["reason"]
    assert out["s3://b/no-image"]["stage"] == "caption" and "no image in 'image_png'" in out["s3://b/no-image"]["reason"]
    for i in range(10):
        record = out[f"s3://b/img{i}.png"]
        assert not record["stage"], record["reason"]
        scores = json.loads(record["scores"])
        jsonschema.validate(scores, DEFAULT_SCORE_SCHEMA)
        assert record["caption"] == scores["caption"] and (record["width"], record["height"]) == (40 + 7 * i, 30 + 3 * i)
        assert record["tokens_in"] > 20  # the image's tokens reached the model, not just the text
