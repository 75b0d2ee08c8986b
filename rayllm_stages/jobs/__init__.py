"""Resumable jobs over one output location: the shared lifecycle (`lifecycle`: prepare, execute,
finalize), committed parts (`run_log`), `manifest.json` (`manifest`), and the batch and chain jobs.
"""
