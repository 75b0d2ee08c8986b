"""The request class a Serve-hosted engine receives from our chain and batch steps.

Ray Data carries rows as Arrow, which turns nested lists (messages) into numpy arrays that the
OpenAI request model rejects; the body therefore travels as one JSON string and is expanded here,
on the Serve side of the call. Importing this module needs vLLM (Ray Serve LLM's protocol models).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import model_validator
from ray.serve.llm.openai_api_models import ChatCompletionRequest

from prefect_rayllm.rayllm_stages.llm.engines import BODY_FIELD


class ChatRequestFromJson(ChatCompletionRequest):
    """A `ChatCompletionRequest` built from `{"body_json": "<OpenAI chat body>", ...}`."""

    @model_validator(mode="before")
    @classmethod
    def _expand_body(cls, data: Any) -> Any:
        if isinstance(data, dict) and BODY_FIELD in data:
            extra = {k: v for k, v in data.items() if k not in (BODY_FIELD, "idx_in_batch")}
            data = {**json.loads(data[BODY_FIELD]), **extra}
        return data
