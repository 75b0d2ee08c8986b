"""Image curation as a Prefect flow: S3 images -> VLM captions and scores -> curated dataset."""

from __future__ import annotations

from typing import Any

from prefect import flow

from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
from prefect_rayllm.tasks.curation import finalize_curation, prepare_curation, publish_curation_report, run_curation
from prefect_rayllm.tasks.reporting import job_failed_hook
from prefect_rayllm.tasks.runtime import connect_ray


@flow(name="curate-images", validate_parameters=True, on_failure=[job_failed_hook("curation")])
def curate_images(config: CurationConfig, overwrite: bool = False) -> dict[str, Any]:
    """Curate images: fetch (retries), decode and check, caption and score with a VLM, filter, dedup.

    Fetch, decode and caption run as one streaming Ray Data pipeline; each image's record is
    committed as it arrives, so a rerun (or a Prefect retry) resumes with the images not yet done.

    Args:
        config: Source (prefix or manifest), model, prompt and schema, fetch/decode/filter settings, output.
        overwrite: Start over when the output holds a run with other images or settings.

    Returns:
        The manifest: counts in, curated, rejected per stage and per reason, fetch retries, and
        the output URLs (curated.parquet, rejected.parquet, contact_sheet.png, manifest.json).
    """
    connect_ray(config.ray_address)
    prepare_curation(config, overwrite)
    execution = run_curation(config)
    manifest = finalize_curation(config, execution)
    publish_curation_report(config, manifest)
    return manifest
