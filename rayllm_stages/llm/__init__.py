"""The model side of a pipeline: the row contract between stages (`rows`: the declared columns, the
one error column, the sampling every row sends), prompt templates (`prompts`), what each step asks
of a model and keeps (`steps`, `vision`), `ray.data.llm` processors for vLLM, Serve and HTTP and the
engine kwargs they get (`engines`), engine sizing (`capacity`; the engine hook is `compat.engine_hooks`), and
Serve-hosted engines shared by steps and jobs (`serve_engine`, `serve_requests`).
"""
