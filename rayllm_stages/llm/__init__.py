"""The model side of a pipeline: prompt templates (`prompts`), what each step asks of a model and keeps
(`steps`, `vision`), `ray.data.llm` processors for vLLM, Serve and HTTP (`engines`), and Serve-hosted
engines shared by steps and jobs (`serve_engine`, `serve_requests`).
"""
