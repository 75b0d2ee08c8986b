"""`python -m prefect_rayllm.flows.cli`: the `rayllm` command."""

from prefect_rayllm.flows.cli import app

app()
