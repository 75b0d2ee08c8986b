"""Prefect flows, one module per job; `flows.cli` is the `rayllm` command."""
