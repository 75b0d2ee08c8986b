"""The curation tasks (tasks/curation.py; the file is named apart from tests/e2e/test_curation.py)
without a model: preparing a run (listing, the job record, refusal), writing the outputs of records
(fetch and decode stages run here, rules, dedup) and publishing the report, with its per-stage
table and contact sheet read back from a real Prefect server."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image
from prefect import flow

from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
from prefect_rayllm.rayllm_stages.jobs.lifecycle import Preparation, ResumeRefused
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.rayllm_stages.testing.image_corpus import build_corpus
from prefect_rayllm.tasks.curation import (
    decode_images,
    dedup_images,
    fetch_images,
    filter_images,
    prepare_curation,
    publish_curation_report,
    report_markdown,
    stage_rows,
    write_curation,
)
from prefect_rayllm.tasks.reporting import artifact_key


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(str(tmp_path_factory.mktemp("corpus")))


def config_for(corpus, output: str, **fields) -> CurationConfig:
    return CurationConfig.model_validate(
        {"source": {"manifest": corpus.manifest_url}, "output": output, "model": {"source": "m"}, **fields}
    )


def test_prepare_lists_the_images_and_refuses_other_settings(tmp_path, prefect_server, corpus):
    config = config_for(corpus, str(tmp_path / "out"))

    @flow
    def prepare(config: CurationConfig, overwrite: bool = False) -> Preparation:
        return prepare_curation(config, overwrite)

    preparation = prepare(config)
    assert (preparation.total_rows, preparation.done_rows, preparation.resumed) == (16, 0, False)
    assert preparation.input_format == "manifest" and not preparation.already_complete
    job = json.loads((tmp_path / "out" / "_rayllm" / "job.json").read_text())
    assert job["kind"] == "curation" and job["fingerprint"] == config.resume_fingerprint()

    assert prepare(config.model_copy(update={"filter": config.filter.model_copy(update={"min_width": 500})})).total_rows == 16
    state = prepare(config.model_copy(update={"prompt": "Rate it."}), return_state=True)
    assert state.is_failed()
    with pytest.raises(ResumeRefused, match="holds a curation run with other settings .*prompt"):
        state.result()
    assert prepare(config.model_copy(update={"prompt": "Rate it."}), overwrite=True).done_rows == 0


def test_outputs_and_report_of_records_without_a_model(tmp_path, prefect_server, corpus):
    output = str(tmp_path / "out")
    uris = corpus.uris()

    @flow
    def curate_without_a_model() -> Manifest:
        decoded = decode_images(fetch_images(uris, {"max_attempts": 2}), {"max_edge": 64})
        records = dedup_images(filter_images(decoded, {"min_width": 32, "min_height": 32}), {"phash_max_distance": 6})
        manifest = write_curation(records, output, model_name="none", contact_sheet_images=6)
        publish_curation_report(config_for(corpus, output), manifest)
        return manifest

    manifest = curate_without_a_model()
    assert manifest.job == "curation" and manifest.curation is not None
    assert (manifest.counts.total, manifest.counts.completed, manifest.counts.failed) == (16, 8, 8)
    assert manifest.counts.errors_by_code == {"decode": 5, "dedup": 2, "fetch": 1}
    assert manifest.curation.computed_now is None and manifest.attempts == []  # written outside a run

    rows = {r["stage"]: r for r in stage_rows(manifest)}
    assert [r["stage"] for r in stage_rows(manifest)] == ["fetch", "decode", "caption", "filter", "dedup", "curated"]
    assert rows["fetch"]["rejected"] == 1 and "FileNotFoundError: 1" in rows["fetch"]["rejected because"]
    assert rows["curated"] == {"stage": "curated", "images in": 16, "passed": 8, "rejected": 8, "rejected because": ""}
    assert "| dedup | 10 | 8 | 2 |" in report_markdown(manifest, None)

    from prefect_api import artifacts_with_key

    table = json.loads(artifacts_with_key(artifact_key("curation-stages", output))[0].data)
    assert table == json.loads(json.dumps(stage_rows(manifest)))
    report = artifacts_with_key(artifact_key("curation-report", output))[0].data
    assert "8 of 16 images kept with `none`" in report and "## Contact sheet (3 kept, 3 rejected)" in report
    inline = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", report)
    assert inline and Image.open(io.BytesIO(base64.b64decode(inline.group(1)))).format == "PNG"
