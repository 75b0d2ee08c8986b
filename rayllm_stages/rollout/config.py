"""Endpoint rollout configuration: the YAML file, the CLI input and the `rollout_endpoint` flow's parameter.

One endpoint is a stable model name behind a stable URL (`http://host:port/<route_prefix>/v1`).
Each model version runs as its own Ray Serve LLM application beside the others; a small router
application at the stable route sends every request to one version by weight. A rollout deploys
the candidate, checks it (health, smoke prompts, optional evaluation gate), shifts traffic in
canary steps, and then promotes it or restores the previous version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from prefect_rayllm.rayllm_stages.config.base import JobConfig, StrictModel, format_validation_error
from prefect_rayllm.rayllm_stages.config.models import ModelSpec
from prefect_rayllm.rayllm_stages.evaluation.config import EvalTarget, EvaluationConfig

# Endpoint names become Serve application names and URL path segments.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,40}$"
CANDIDATE_TARGET = "candidate"


class HttpOptions(StrictModel):
    """Where Serve's HTTP proxy listens, and how the flow process reaches it."""

    host: str = Field("127.0.0.1", description="bind address of Serve's HTTP proxy")
    port: int = Field(8000, ge=1, le=65535)
    public_url: str | None = Field(
        None, description="base URL the flow process uses (default http://host:port); e.g. for a remote cluster"
    )

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


class SmokePrompt(StrictModel):
    """One golden prompt: the reply must be non-empty, arrive in time, and match what is given."""

    prompt: str = Field(min_length=1)
    expect: str | None = Field(None, description="a substring the reply must contain")
    json_schema: dict[str, Any] | None = Field(None, description="the reply must be JSON matching this schema")
    max_latency_s: float = Field(30.0, gt=0)
    max_tokens: int = Field(16, ge=1)


class CanaryStep(StrictModel):
    """Send `percent` of the traffic to the candidate for `hold_s`, then check what it served."""

    percent: int = Field(ge=1, le=100)
    hold_s: float = Field(10.0, ge=0)
    max_error_rate: float = Field(0.0, ge=0.0, le=1.0, description="candidate 5xx / requests in the step")
    max_p99_latency_s: float | None = Field(None, gt=0, description="candidate p99 latency in the step")
    probe_requests: int = Field(4, ge=0, description="smoke prompts sent through the stable URL during the hold")
    min_requests: int = Field(0, ge=0, description="fewest candidate requests for the step to count as checked")


class RolloutTimeouts(StrictModel):
    deploy_s: float = Field(900.0, gt=0, description="candidate app RUNNING and listing the model")
    request_s: float = Field(60.0, gt=0, description="one HTTP request of a check")
    drain_s: float = Field(2.0, ge=0, description="wait after a traffic shift before deleting a version")
    check_attempts: int = Field(
        3, ge=1, description="tries of a check that could not be measured (infrastructure error, timeout) before `inconclusive`"
    )
    check_backoff_s: float = Field(10.0, ge=0, description="wait before a check's second try; doubled before each later one")


class RolloutConfig(JobConfig):
    """A rollout of one model version to one endpoint.

    Example:
        ```yaml
        endpoint: colours
        model_id: colours
        candidate: {source: ./models/tiny, engine_kwargs: {max_model_len: 256}, concurrency: [1, 2]}
        smoke: [{prompt: "Is red warm or cool?", expect: warm}]
        canary: [{percent: 10, hold_s: 30}, {percent: 50, hold_s: 30}, {percent: 100, hold_s: 30}]
        ```
    """

    endpoint: str = Field(pattern=NAME_PATTERN, description="names the router app and the version apps")
    route_prefix: str | None = Field(None, description="stable route (default /<endpoint>)")
    model_id: str = Field(min_length=1, description="the stable model name clients send")
    candidate: ModelSpec = Field(description="the version to roll out (engine vllm fields)")
    lora_config: dict[str, Any] | None = Field(None, description="passed to Ray Serve LLM's LoraConfig")
    autoscaling: dict[str, Any] = Field(
        default_factory=dict, description="extra Serve autoscaling_config keys (bounds come from candidate.concurrency)"
    )
    http: HttpOptions = Field(default_factory=HttpOptions)
    router_replicas: int = Field(1, ge=1, description="replicas of the router app (it holds no model)")
    api_key_env: str | None = Field(None, description="environment variable with the endpoint's API key")
    api_key_secret: str | None = Field(None, description="Prefect Secret block with the endpoint's API key")
    smoke: list[SmokePrompt] = Field(min_length=1)
    evaluation: dict[str, Any] | None = Field(
        None, description="an evaluation config without `targets`: the candidate's URL becomes its one target"
    )
    canary: list[CanaryStep] = Field(
        default_factory=lambda: [CanaryStep(percent=10), CanaryStep(percent=50), CanaryStep(percent=100)]
    )
    timeouts: RolloutTimeouts = Field(default_factory=RolloutTimeouts)

    @field_validator("route_prefix")
    @classmethod
    def _route_valid(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or value == "/" or value.endswith("/")):
            raise ValueError("route_prefix must start with '/', and not be '/' or end with '/'")
        return value

    @field_validator("candidate")
    @classmethod
    def _candidate_is_an_engine(cls, spec: ModelSpec) -> ModelSpec:
        if spec.engine != "vllm":
            raise ValueError("candidate.engine must be 'vllm' (the rollout hosts it on Ray Serve LLM)")
        return spec

    @field_validator("canary")
    @classmethod
    def _canary_rises_to_100(cls, steps: list[CanaryStep]) -> list[CanaryStep]:
        percents = [s.percent for s in steps]
        if percents and (percents != sorted(set(percents)) or percents[-1] != 100):
            raise ValueError(f"canary percents must rise strictly and end at 100 (got {percents})")
        return steps

    @model_validator(mode="after")
    def _consistent(self) -> RolloutConfig:
        if self.candidate.id is not None and self.candidate.id != self.model_id:
            raise ValueError(f"candidate.id must be unset or equal model_id ({self.model_id!r}): the endpoint serves one name")
        if self.api_key_env and self.api_key_secret:
            raise ValueError("give api_key_env or api_key_secret, not both")
        if self.evaluation is not None:
            if "targets" in self.evaluation:
                raise ValueError("evaluation.targets: leave it out; the rollout evaluates the candidate's URL")
            try:  # refuse a bad evaluation before any engine starts
                self.evaluation_config("http://127.0.0.1:1/v1", "v-check")
            except ValidationError as exc:
                problems = format_validation_error(exc, "evaluation", EvaluationConfig).splitlines()[1:]
                raise ValueError("evaluation is invalid: " + "; ".join(p.strip() for p in problems)) from None
        return self

    @property
    def route(self) -> str:
        return self.route_prefix or f"/{self.endpoint}"

    @property
    def stable_url(self) -> str:
        """The OpenAI base URL clients use (…/v1)."""
        return f"{self.http.base_url}{self.route}/v1"

    def version_id(self) -> str:
        """A version names what it serves: the same candidate settings give the same id (retries reuse it)."""
        identity = {
            **self.candidate.engine_identity(),
            "id": self.model_id,
            "lora_config": self.lora_config,
            "autoscaling": self.autoscaling,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        return f"v-{digest[:8]}"

    def served_spec(self) -> ModelSpec:
        """The candidate spec serving the endpoint's stable model name."""
        return self.candidate.model_copy(update={"id": self.model_id})

    def endpoint_spec(self, base_url: str) -> ModelSpec:
        """An `engine: http` spec for `base_url` carrying the endpoint's key reference (never the key)."""
        return ModelSpec(
            source=self.model_id,
            engine="http",
            base_url=base_url,
            api_key_env=self.api_key_env,
            api_key_secret=self.api_key_secret,
        )

    def evaluation_config(self, candidate_url: str, version: str) -> EvaluationConfig | None:
        """The evaluation of one candidate: its URL as the only target, outputs per version, and a
        gate that reports instead of failing (the rollout decides)."""
        if self.evaluation is None:
            return None
        data = dict(self.evaluation)
        if not data.get("output"):
            raise ValueError("evaluation.output is required (each candidate version writes under it)")
        data["targets"] = [EvalTarget(name=CANDIDATE_TARGET, model=self.endpoint_spec(candidate_url))]
        data["output"] = f"{str(data.get('output', '')).rstrip('/')}/{version}"
        if not data.get("ray_address") and not data.get("ray_block"):  # the rollout's own Ray, however it was named
            data["ray_address"], data["ray_block"] = self.ray_address, self.ray_block
        gate = dict(data.get("gate") or {})
        gate["fail_flow"] = False
        data["gate"] = gate
        return EvaluationConfig.model_validate(data)
