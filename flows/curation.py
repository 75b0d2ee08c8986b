"""Image curation as a Prefect flow: S3 images -> VLM captions and scores -> curated dataset."""

from __future__ import annotations

from functools import partial

from prefect import flow

from prefect_rayllm.flows.jobs import run_job
from prefect_rayllm.rayllm_stages.curation.config import CurationConfig
from prefect_rayllm.rayllm_stages.jobs.manifest import Manifest
from prefect_rayllm.tasks.curation import finalize_curation, prepare_curation, publish_curation_report, run_curation
from prefect_rayllm.tasks.jobs import FLOW_RESULT, run_lifecycle
from prefect_rayllm.tasks.reporting import job_failed_hook


@flow(name="curate-images", validate_parameters=True, on_failure=[job_failed_hook("curation")], **FLOW_RESULT)
def curate_images(config: CurationConfig, overwrite: bool = False) -> Manifest:
    """Curate images: fetch (retries), decode and check, caption and score with a VLM, filter, dedup.

    Fetch, decode and caption run as one streaming Ray Data pipeline; each image's record is
    committed as it arrives, so a rerun (or a Prefect retry) resumes with the images not yet done.

    Args:
        config: Source (prefix or manifest), model, prompt and schema, fetch/decode/filter settings, output.
        overwrite: Start over when the output holds a run with other images or settings.

    Returns:
        The manifest: counts (images, curated, rejected), and in its `curation` section the
        rejections per stage and per reason, fetch retries and the contact sheet's sample; the
        output URLs (curated.parquet, rejected.parquet, contact_sheet.png, manifest.json). It is
        the run's persisted result. Not cached: each run lists the source again and curates what is new.
    """
    return run_job(
        "curation",
        config,
        overwrite,
        execute=partial(run_lifecycle, prepare=prepare_curation, run=run_curation, finalize=finalize_curation),
        publish=lambda manifest: publish_curation_report(config, manifest),
    )
