"""The `rayllm` command (console script `rayllm = prefect_rayllm.flows.cli:app`), one module per group:

    app.py          the root: help panels, --version, one error path and exit codes for every command
    jobs.py         Jobs: batch, chain, evaluate, curate, rollout (config and input checked before any runtime)
    endpoints.py    Endpoints: endpoint status, scale, teardown
    deployments.py  Deployments: deploy, serve
    api.py          Deployments: api (the OpenAI-compatible Batch API)
    tools.py        Local tools: validate, demo, make-tiny-model, make-image-corpus

Each group module holds its commands in its own `commands` Typer; this module adds them to the root
in the order `--help` shows them. Running a flow in this process (runtimes, progress bar) is
`prefect_rayllm.flows.local`, which the demo uses too: neither the demo nor a flow imports the CLI.
"""

from prefect_rayllm.flows.cli import api, deployments, endpoints, jobs, tools
from prefect_rayllm.flows.cli.app import app

for _group in (jobs, endpoints, deployments, api, tools):
    app.add_typer(_group.commands)

__all__ = ["app"]
