"""Prefect tasks over `rayllm_stages`: retries, progress, artifacts and events around each step."""
