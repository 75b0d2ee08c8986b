"""Ray Data building blocks for LLM jobs, usable without Prefect (this package never imports it).

- `config`: the job configs (pydantic), shared by YAML files, the CLI and the flows.
- `batch` / `chain`: jobs (prepare -> execute -> finalize) over one output location; `job` is their base.
- `batch_input`, `batch_output`: reading and checking input rows; writing result and error lines.
- `engines`, `steps`: `ray.data.llm` processors (vLLM, Serve, HTTP) and what each step asks and keeps.
- `serve_engine`, `serve_requests`: Serve-hosted engines shared by steps and jobs.
- `eval_config`, `evaluation`, `eval_metrics`, `eval_stats`, `eval_report`: evaluation runs, scoring,
  bootstrap intervals, baselines, gates and reports.
- `rollout_config`, `endpoints`, `traffic`: Serve LLM endpoint versions, the weighted router, rollout steps.
- `curation`, `image_source`, `image_fetch`, `image_decode`, `image_filter`, `vision`, `image_report`: image
  curation (`image_report`: the contact sheet).
- `run_log`, `manifest`, `storage`: resumable committed parts, `manifest.json`, fsspec locations.
- `ray_runtime`: one Ray per process, and reaping clusters left by dead drivers.
- `tiny_models`, `tiny_vision`, `local_s3`, `image_corpus`, `s3_proxy`: small local models, an S3
  server on loopback, a test image corpus and a fault-injecting S3 proxy, for tests, demos and benches.
"""
