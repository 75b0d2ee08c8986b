"""The OpenAI Batch API's objects, storage and input checks, without Prefect (the API is `prefect_rayllm.flows.api`).

objects.py  File, Batch and list objects field for field as the `openai` SDK reads them; the
            batch status from the stored record, the run's state and the committed counts
store.py    uploaded files, batch records and their outputs at one fsspec location
checks.py   an uploaded file checked for a batch: every line as `rayllm batch` reads it, one model
"""
