"""Endpoint rollout on Ray Serve LLM: config (`config`), versions and their lifecycle (`endpoints`), the
weighted router between versions (`traffic`).
"""
