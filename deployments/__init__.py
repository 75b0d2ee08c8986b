"""Prefect deployment definitions (prefect.yaml, `rayllm deploy`, a local `serve` entry point).

Scheduled deployments are the open issue "Scheduled deployments, UI runs and observability"; until
then, run flows with `rayllm batch` or `flows.batch.batch_inference(config=...)`.
"""
