"""Private Ray names, each behind a function that checks it against the installed Ray.

What is here has no public Ray equivalent (Ray 2.60):

- a Serve deployment's code version (`options(version=..., _internal=True)`): without it every
  imperative deploy restarts every replica, so a traffic shift or a scale change would reload the
  model. Serve's declarative config (which keeps replicas on a config-only change) is no way out
  here: a declarative deploy replaces every application on the cluster, and this package's batch
  jobs and endpoints deploy and delete applications independently of each other, imperatively;
- the OpenAI ingress's per-request choice of a model handle, its model cards (`to_model_metadata`)
  and its OpenAI error type (the endpoint router reuses Ray's OpenAI front end whole);
- calling a method on every replica of a deployment (`broadcast`), the Serve controller's actor
  name (whether Serve runs at all), the running Serve's HTTP port;
- the stream of worker output Ray prints on the driver, the local node's session directory, the
  package whose import takes the root logger over (imported alone, to keep that moment short);
- the worker setup hook's environment variable and the vLLM stage module (`engine_hooks`).

Every accessor first checks the installed Ray against the tested series (the `ray==` pin of
this package), then the name itself, and raises `RayCompatError` naming the Ray version and the
missing name. `RAYLLM_ALLOW_UNTESTED_RAY=1` lets an untested Ray through; a missing name still fails.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import re
from typing import Any

logger = logging.getLogger(__name__)

ALLOW_UNTESTED_ENV = "RAYLLM_ALLOW_UNTESTED_RAY"
FALLBACK_SERIES = "2.60"  # when the package metadata is not readable (a source checkout without install)

OPENAI_MODELS = "ray.llm._internal.serve.core.configs.openai_api_models"
LORA_UTILS = "ray.llm._internal.common.utils.lora_utils"
BROADCAST = "ray.llm._internal.serve.utils.broadcast"
SERVE_CONSTANTS = "ray.serve._private.constants"
SERVE_CONTEXT = "ray.serve.context"
RAY_LOGGING = "ray._private.ray_logging"
RAY_WORKER = "ray._private.worker"
RAY_CONSTANTS = "ray._private.ray_constants"
VLLM_ENGINE_STAGE = "ray.llm._internal.batch.stages.vllm_engine_stage"
SERVE_LLM_PACKAGE = "ray.llm._internal.serve"

# Module-level names used here (and by `engine_hooks`), for the check that each exists on this Ray.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    (OPENAI_MODELS, "to_model_metadata"),
    (OPENAI_MODELS, "ModelCard"),
    (OPENAI_MODELS, "OpenAIHTTPException"),
    (LORA_UTILS, "get_base_model_id"),
    (BROADCAST, "broadcast"),
    (SERVE_CONSTANTS, "SERVE_CONTROLLER_NAME"),
    (SERVE_CONSTANTS, "SERVE_NAMESPACE"),
    (SERVE_CONTEXT, "_get_global_client"),
    (RAY_LOGGING, "global_worker_stdstream_dispatcher"),
    (RAY_WORKER, "_global_node"),
    (RAY_CONSTANTS, "WORKER_PROCESS_SETUP_HOOK_ENV_VAR"),
)
# Private members of public Ray classes used here: (public module, class, member).
PRIVATE_MEMBERS: tuple[tuple[str, str, str], ...] = (
    ("ray.serve.llm.ingress", "OpenAiIngress", "_get_configured_serve_handle"),
    ("ray.serve.llm.ingress", "OpenAiIngress", "_process_llm_request"),
)
# Private keyword arguments of public Ray functions used here: (module, qualified name, argument).
PRIVATE_ARGUMENTS: tuple[tuple[str, str, str], ...] = (
    ("ray.serve.deployment", "Deployment.options", "version"),
    ("ray.serve.deployment", "Deployment.options", "_internal"),
    ("ray.serve.deployment", "Deployment.options", "_init_kwargs"),
)
# Instance attributes of OpenAiIngress that the router sets; its __init__ must still create them.
INGRESS_STATE = ("_model_cards", "_lora_paths", "_configured_serve_handles")


class RayCompatError(RuntimeError):
    """The installed Ray is not the tested one, or lacks a private name this package uses."""


def installed_ray_version() -> str:
    import ray

    return str(ray.__version__)


@functools.lru_cache(maxsize=1)
def tested_ray_series() -> str:
    """The Ray release series this package is tested with ("2.60"), from its `ray==` requirement."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        requirements = requires("prefect-rayllm") or []
    except PackageNotFoundError:
        return FALLBACK_SERIES
    for requirement in requirements:
        found = re.match(r"^ray(\[[^\]]*\])?\s*==\s*(\d+)\.(\d+)", requirement)
        if found:
            return f"{found.group(2)}.{found.group(3)}"
    return FALLBACK_SERIES


def _untested_message(version: str) -> str:
    return (
        f"Ray {version} is installed, but prefect-rayllm is tested with Ray {tested_ray_series()}.x and uses private "
        f"Ray names that change between releases (prefect_rayllm.rayllm_stages.compat). Install Ray "
        f"{tested_ray_series()}.x, or set {ALLOW_UNTESTED_ENV}=1 to try this one (a missing name still fails, named)."
    )


def check_ray_version(version: str | None = None) -> None:
    """Raise `RayCompatError` unless Ray `version` (default: the installed one) is of the tested series.

    With `RAYLLM_ALLOW_UNTESTED_RAY=1` an untested version only logs a warning.
    """
    version = version or installed_ray_version()
    if version == tested_ray_series() or version.startswith(tested_ray_series() + "."):
        return
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        _warn_untested(version)
        return
    raise RayCompatError(_untested_message(version))


@functools.cache
def _warn_untested(version: str) -> None:
    logger.warning("%s", _untested_message(version).replace(f", or set {ALLOW_UNTESTED_ENV}=1 to try this one", ""))


def _missing(what: str) -> RayCompatError:
    return RayCompatError(
        f"Ray {installed_ray_version()} has no {what}, a private Ray name prefect-rayllm uses "
        f"(tested with Ray {tested_ray_series()}.x; see prefect_rayllm.rayllm_stages.compat)"
    )


def private_name(module: str, name: str | None = None) -> Any:
    """`module.name` (the module itself when `name` is None), checked: `RayCompatError` if it is gone."""
    check_ray_version()
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise _missing(f"module {module}") from exc
        raise  # a dependency of Ray's module is missing (vLLM, ...): not a Ray change
    if name is None:
        return found
    try:
        return getattr(found, name)
    except AttributeError as exc:
        raise _missing(f"{module}.{name}") from exc


def private_member(owner: Any, name: str) -> Any:
    """`owner.name` for a private member of a Ray object or class, checked."""
    try:
        return getattr(owner, name)
    except AttributeError as exc:
        kind = owner if isinstance(owner, type) else type(owner)
        raise _missing(f"{kind.__module__}.{kind.__qualname__}.{name}") from exc


def private_argument(function: Any, argument: str) -> None:
    """Check that `function` (a Ray callable) still takes the private keyword `argument`."""
    if argument not in inspect.signature(function).parameters:
        raise _missing(f"argument {argument!r} of {function.__module__}.{function.__qualname__}")


def check_all(include_vllm_stage: bool = False) -> None:
    """Check every private name of this module on the installed Ray (the vLLM stage imports vLLM:
    only on request)."""
    for module, name in PRIVATE_NAMES:
        private_name(module, name)
    for module, owner, member in PRIVATE_MEMBERS:
        private_member(getattr(importlib.import_module(module), owner), member)
    for module, qualname, argument in PRIVATE_ARGUMENTS:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
        private_argument(target, argument)
    _check_ingress_state()
    private_name(SERVE_LLM_PACKAGE)
    if include_vllm_stage:
        stage = private_name(VLLM_ENGINE_STAGE)
        private_member(private_member(stage, "vLLMEngineWrapper"), "_prepare_llm_request")
        private_member(stage, "vLLMOutputData").from_vllm_engine_output  # noqa: B018


def _check_ingress_state() -> None:
    from ray.serve.llm.ingress import OpenAiIngress

    source = inspect.getsource(OpenAiIngress.__init__)
    for attribute in INGRESS_STATE:
        if f"self.{attribute}" not in source:
            raise _missing(f"ray.serve.llm.ingress.OpenAiIngress attribute {attribute}")


# -- Ray Serve ----------------------------------------------------------------------------------
def serve_controller_running() -> bool:
    """Whether a Serve controller runs on the connected cluster (`serve.status()` answers empty
    whether or not Serve was ever started)."""
    import ray

    name = private_name(SERVE_CONSTANTS, "SERVE_CONTROLLER_NAME")
    namespace = private_name(SERVE_CONSTANTS, "SERVE_NAMESPACE")
    try:
        ray.get_actor(name, namespace=namespace)
        return True
    except ValueError:
        return False


def serve_http_port() -> int | None:
    """The HTTP port of the running Serve's proxies; None when it cannot be read."""
    get_client = private_name(SERVE_CONTEXT, "_get_global_client")
    try:
        return int(get_client().http_config.port)
    except Exception:  # Serve stopped in between, or no client: nothing to compare
        return None


def with_code_version(deployment: Any, version: str, **options: Any) -> Any:
    """`deployment.options(**options)` with Serve's code version pinned to `version`.

    Serve compares code versions to choose between reconfiguring the running replicas in place
    (same version: `user_config`, autoscaling) and replacing them; Ray 2.60 refuses `version` from
    users (`_internal=True` lets it through), and leaves an imperative deploy without one a random
    version, so each redeploy would restart every replica.
    """
    for argument in ("version", "_internal"):
        private_argument(type(deployment).options, argument)
    return deployment.options(version=version, _internal=True, **options)


def pin_openai_app_version(app: Any, version: str) -> Any:
    """`build_openai_app`'s application with the code version of its engine deployments pinned
    (`with_code_version`): a redeploy that changes only autoscaling updates the running replicas."""
    from ray.serve.deployment import Application

    ingress = private_member(app, "_bound_deployment")
    kwargs = dict(private_member(ingress, "_replica_config").init_kwargs or {})
    kwargs["llm_deployments"] = {
        model: Application(with_code_version(private_member(engine, "_bound_deployment"), version))
        for model, engine in kwargs["llm_deployments"].items()
    }
    private_argument(type(ingress).options, "_init_kwargs")
    return Application(ingress.options(_init_kwargs=kwargs, _internal=True))


def openai_model_card(model_id: str, llm_config: Any) -> dict[str, Any]:
    """What Ray's OpenAI ingress lists on `/v1/models` for `llm_config` served as `model_id`."""
    to_model_metadata = private_name(OPENAI_MODELS, "to_model_metadata")
    return dict(to_model_metadata(model_id, llm_config).model_dump())


def openai_http_exception() -> type[Exception]:
    """The exception Ray's OpenAI ingress turns into an OpenAI error reply (`status_code`, `type`)."""
    exc: type[Exception] = private_name(OPENAI_MODELS, "OpenAIHTTPException")
    return exc


def broadcast(handle: Any, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
    """Call `method(*args)` on every replica behind `handle`; one result per replica."""
    call = private_name(BROADCAST, "broadcast")
    return list(call(handle, method, args=args))


def version_routed_ingress() -> type:
    """A subclass of Ray's public `OpenAiIngress` whose model handle is chosen per request.

    Subclasses implement `chosen_route()` -> (route key, handle) for the request being handled,
    call `serve_model` when the model they serve changes, and `forward` to answer a request exactly
    as Ray's ingress does (errors, streaming). Everything private about the ingress is here.
    """
    from ray.serve.llm.ingress import OpenAiIngress

    model_card = private_name(OPENAI_MODELS, "ModelCard")
    get_base_model_id = private_name(LORA_UTILS, "get_base_model_id")
    for member in ("_get_configured_serve_handle", "_process_llm_request"):
        private_member(OpenAiIngress, member)
    _check_ingress_state()

    class VersionRoutedIngress(OpenAiIngress):
        def __init__(self) -> None:
            super().__init__(llm_deployments={}, model_cards={})

        def serve_model(self, model_id: str, card: dict[str, Any], lora_path: str | None) -> None:
            """List `model_id` with `card` from now on; handles chosen before are forgotten."""
            self._model_cards = {model_id: model_card.model_validate(card)}
            self._lora_paths = {model_id: lora_path} if lora_path else {}
            self._configured_serve_handles = {}

        def chosen_route(self) -> tuple[str, Any]:
            raise NotImplementedError

        def _get_configured_serve_handle(self, model_id: str) -> Any:
            route, handle = self.chosen_route()
            key = f"{route}\0{model_id}"
            if key not in self._configured_serve_handles:
                if model_id == get_base_model_id(model_id):
                    self._configured_serve_handles[key] = handle.options(stream=True)
                else:  # a LoRA adapter: Serve's multiplexing picks a replica that has it loaded
                    self._configured_serve_handles[key] = handle.options(stream=True, multiplexed_model_id=model_id)
            return self._configured_serve_handles[key]

        async def forward(self, body: Any, method: str, request: Any) -> Any:
            return await self._process_llm_request(body, call_method=method, raw_request=request)

    return VersionRoutedIngress


# -- Ray core -----------------------------------------------------------------------------------
def worker_stdstream_dispatcher() -> Any:
    """Ray's dispatcher of worker stdout/stderr lines on the driver (`add_handler`, `remove_handler`)."""
    return private_name(RAY_LOGGING, "global_worker_stdstream_dispatcher")


def ray_session_dir() -> str | None:
    """The session directory of the Ray node this process started or joined; None without one."""
    node = private_name(RAY_WORKER, "_global_node")
    return str(node.get_session_dir_path()) if node is not None else None


def worker_setup_hook_env_var() -> str:
    """The environment variable through which Ray runs a worker's setup hook (what
    `runtime_env={"worker_process_setup_hook": ...}` sets for a job)."""
    return str(private_name(RAY_CONSTANTS, "WORKER_PROCESS_SETUP_HOOK_ENV_VAR"))


def import_serve_llm_package() -> None:
    """Import `ray.llm._internal.serve`, the package under `ray.serve.llm`, and nothing more.

    Its import replaces the root logger's handlers with Ray's JSON one at INFO; the caller puts the
    root logger back right after. Importing `ray.serve.llm` instead would go on importing vLLM's
    protocol models for seconds with Ray's handler in place, and another thread's INFO records
    (an HTTP client's) would reach the console as JSON meanwhile.
    """
    private_name(SERVE_LLM_PACKAGE)


def vllm_engine_stage() -> Any:
    """Ray Data LLM's vLLM engine stage module (imports vLLM, torch, transformers: seconds)."""
    return private_name(VLLM_ENGINE_STAGE)
