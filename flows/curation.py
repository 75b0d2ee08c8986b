"""Image curation as a Prefect flow: S3 images -> VLM captions and scores -> curated dataset."""

from __future__ import annotations

from typing import Any

from prefect import flow

from rayllm_stages.curation import CurationConfig
from tasks.curation import publish_curation_report, run_curation
from tasks.runtime import connect_ray


@flow(name="curate-images", validate_parameters=True)
def curate_images(config: CurationConfig, overwrite: bool = False) -> dict[str, Any]:
    """Curate images: fetch (retries), decode and check, caption and score with a VLM, filter, dedup.

    Args:
        config: Source (prefix or manifest), model, prompt and schema, fetch/decode/filter settings, output.
        overwrite: Accepted for the shared CLI; a curation run always rewrites its outputs.

    Returns:
        The manifest: counts in, curated, rejected per stage and per reason, and the output URLs.
    """
    connect_ray(config.ray_address)
    manifest = run_curation(config)
    publish_curation_report(config, manifest)
    return manifest
