"""Image curation, one job per module:

config         CurationConfig: source, model, prompt and schema, fetch/decode/filter settings, output
source         listing the images (a prefix or a manifest of URIs)
fetch          reading objects with retries (FetchImages)
decode         checks, EXIF, RGB, resize, hashes (DecodeImages)
stages         the stages over a Ray Dataset or a list of rows: fetch, decode, caption, rules, dedup
records        the record (one image's row after captioning), its fields and coercion
filters        the rules and the dedup settings
funnel         counts per stage and reason, fetch retries
contact_sheet  a sample of kept and rejected images as one PNG
writer         curated.parquet, rejected.parquet, contact sheet and manifest.json
log_records    records in the run log: committed by the worker holding them, found again by URI
run            the resumable, incremental run (the shared job lifecycle of `jobs.lifecycle`); the
               driver coordinates, workers hold the records (finalize is one Ray task)
"""
