"""Prefect tasks over `rayllm_stages`: retries, progress, artifacts and events around each step."""

# The collection's blocks: registered with Prefect (the `prefect.collections` entry point imports
# this package), and their loader installed for `rayllm_stages`' jobs (`storage_block`).
from prefect_rayllm.tasks import blocks as blocks
