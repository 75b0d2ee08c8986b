"""Prefect flows, one module per job; `prefect_rayllm.flows.cli` is the `rayllm` command."""
