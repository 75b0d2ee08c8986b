"""Ray Data and Ray Serve building blocks for LLM jobs, usable without Prefect (never imports it).

Subpackages, one job each: `config`, `io`, `llm`, `runtime`, `jobs`, `curation`, `evaluation`,
`rollout`, and `testing` (fixtures and builders for tests, demos and benchmarks).
"""
