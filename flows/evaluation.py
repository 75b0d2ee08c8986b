"""Evaluation as a Prefect flow: targets answer, a judge grades, scores meet a baseline and a gate."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from prefect_rayllm.rayllm_stages.evaluation.config import EvaluationConfig
from prefect_rayllm.rayllm_stages.evaluation.metrics import ScoredExample
from prefect_rayllm.rayllm_stages.evaluation.run import EvaluationResult, answer_chain_config, conclude, judge_chain_config
from prefect_rayllm.tasks.chain import finalize_chain, prepare_chain, run_chain_steps
from prefect_rayllm.tasks.evaluation import (
    GateFailed,
    check_evaluation_input,
    gate_failure_message,
    load_baseline,
    publish_evaluation,
    score_target,
    write_evaluation,
)
from prefect_rayllm.tasks.jobs import FLOW_RESULT
from prefect_rayllm.tasks.reporting import job_failed_hook
from prefect_rayllm.tasks.runtime import connect_ray


# Whatever fails the run (the gate, a bad dataset, an engine): `rayllm.evaluation.failed` with the
# reason; `rayllm.evaluation.completed` has already told the verdict when the gate was reached.
@flow(
    name="evaluate",
    validate_parameters=True,
    on_failure=[job_failed_hook("evaluation", key="name", unknown="unnamed")],
    **FLOW_RESULT,
)
def evaluate(config: EvaluationConfig, overwrite: bool = False) -> EvaluationResult:
    """Evaluate every target on the dataset; compare with the baseline; apply the gate.

    Args:
        config: Dataset, targets, prompt, metrics, optional judge, baseline, gate and output.
        overwrite: Start over when the output holds answers made with other settings (else they resume).

    Returns:
        The typed result: per target a summary (means with bootstrap intervals, per slice), the
        deltas against the baseline, and the gate's verdict; also the run's persisted result. When the gate fails and
        `gate.fail_flow` is true (the default) the flow run fails after writing everything,
        so a rollout or an automation can depend on it.
    """
    connect_ray(config.ray_address, config.ray_block)
    check_evaluation_input(config)
    for target in config.targets:
        _run_chain(answer_chain_config(config, target), overwrite)
        judge = judge_chain_config(config, target)
        if judge is not None:
            _run_chain(judge, overwrite)
    scored = score_targets(config)
    baseline, source = load_baseline(config)
    if config.baseline is not None and config.baseline.target:
        reference = config.baseline.target
        baseline = {name: scored[reference] for name in scored if name != reference}
        source = f"target {reference} of this run"
    result = write_evaluation(config, conclude(config, scored, baseline, source), scored)
    publish_evaluation(config, result)
    for name, verdict in result.verdicts.items():
        get_run_logger().info("target %s: gate %s", name, "passed" if verdict.passed else "FAILED")
    if not result.passed and config.gate.fail_flow:
        raise GateFailed(gate_failure_message(result))
    return result


# Scoring is light (files in, numbers out), so it runs in this flow process, one thread per target.
# It used to fan out over Ray with prefect-ray's RayTaskRunner: on an external cluster each Ray
# worker then started its own temporary Prefect server (the driver's API is not reachable from
# there), which timed out under load and turned a gate into a crash.
# Its scores are per example: passed back in memory, never persisted (the flow's result is the summary).
@flow(name="score-targets", task_runner=ThreadPoolTaskRunner(max_workers=4), persist_result=False)  # type: ignore[arg-type]
def score_targets(config: EvaluationConfig) -> dict[str, list[ScoredExample]]:
    """Score each target as its own task, in this flow process."""
    futures = {target.name: score_target.submit(config, target.name) for target in config.targets}
    return {name: future.result() for name, future in futures.items()}


def _run_chain(chain, overwrite: bool) -> None:
    preparation = prepare_chain(chain, overwrite)
    execution = None if preparation.already_complete else run_chain_steps(chain)
    finalize_chain(chain, execution)
