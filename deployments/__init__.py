"""Prefect deployments of the flows: `prefect.yaml` (schedules, work pool, parameters, triggers,
concurrency), `rayllm deploy` (register them against a Prefect server or Cloud), and
`rayllm serve` / `python -m prefect_rayllm.deployments.serve` (run them all from one process, no worker).

Modules: `project` reads prefect.yaml and wraps `prefect deploy`; `serve` builds the same
deployments for `prefect.serve`; `server` starts a local `prefect server start`; `steps` holds the
pull step (a local checkout, or a git clone).
"""
