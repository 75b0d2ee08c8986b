"""Multi-model chains as a Prefect flow: one model reformats, another answers, a third may score."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from rayllm_stages.config import ChainJobConfig
from rayllm_stages.manifest import Manifest
from tasks.chain import finalize_chain, prepare_chain, run_chain_steps
from tasks.reporting import conclude_job, emit_job_event, publish_chain_report
from tasks.runtime import connect_ray


@flow(name="run-chain", validate_parameters=True)
def run_chain(config: ChainJobConfig, overwrite: bool = False) -> Manifest:
    """Run a text-curation chain (e.g. reformat -> answer -> score) with all steps overlapping.

    Args:
        config: The table, the ordered steps (model, prompt, sampling, output column, parse) and limits.
        overwrite: Start over when the output holds a run with other settings.

    Returns:
        The manifest, with per-step rows, errors and tokens. The run fails (after writing) when the
        error rate passes `config.max_error_rate`.
    """
    run = FlowRunContext.get()
    flow_run_id = str(run.flow_run.id) if run and run.flow_run else None
    try:
        connect_ray(config.ray_address)
        preparation = prepare_chain(config, overwrite)
        execution = None if preparation.already_complete else run_chain_steps(config)
        manifest = finalize_chain(config, execution, flow_run_id)
        publish_chain_report(manifest)
    except Exception as exc:
        emit_job_event("chain", "failed", config.output, {"reason": f"{type(exc).__name__}: {exc}"[:2000]})
        raise
    conclude_job("chain", config.output, manifest, config.max_error_rate)
    get_run_logger().info("results: %s", manifest.outputs["results"])
    return manifest
