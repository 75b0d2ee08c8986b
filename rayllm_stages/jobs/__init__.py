"""Resumable jobs over one output location: the lifecycle that batch, chain and curation share
(`lifecycle`: `ResumableJob` with prepare, execute, finalize; `LLMJob` for the row jobs), committed
parts (`run_log`), `manifest.json` as one `Manifest` type with a section per job (`manifest`), and
the batch and chain jobs (curation's is `curation.run.CurationJob`), and every job kind with the
checks of its input before any runtime starts (`kinds`).
"""
