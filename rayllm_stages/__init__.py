"""Ray Data building blocks for LLM jobs, usable without Prefect (this package never imports it).

- `config`: the job configs (pydantic), shared by YAML files, the CLI and the flows.
- `batch` / `chain`: jobs (prepare -> execute -> finalize) over one output location; `job` is their base.
- `batch_input`, `batch_output`: reading and checking input rows; writing result and error lines.
- `engines`, `steps`: `ray.data.llm` processors (vLLM, HTTP) and what each step asks and keeps.
- `run_log`, `manifest`, `storage`: resumable committed parts, `manifest.json`, fsspec locations.
- `ray_runtime`: one Ray per process, and reaping clusters left by dead drivers.
- `tiny_models`, `local_s3`: small local models and an S3 server on loopback, for tests and demos.
"""
