"""The compat module: the tested Ray series, loud failures naming the Ray version and the missing
name, and each private name it uses present on the installed Ray."""

from __future__ import annotations

import re
import tomllib

import pytest
import ray
from conftest import REPO

from prefect_rayllm.rayllm_stages.compat import ray_private
from prefect_rayllm.rayllm_stages.compat.ray_private import RayCompatError


def test_tested_series_is_the_pin_and_the_installed_ray_is_in_it() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in dependencies if re.match(r"^ray(\[|=)", d)]
    major, minor = re.search(r"==\s*(\d+)\.(\d+)", pin).groups()  # type: ignore[union-attr]
    assert ray_private.tested_ray_series() == f"{major}.{minor}"
    assert ray.__version__.startswith(f"{major}.{minor}.")
    ray_private.check_ray_version()


def test_an_untested_ray_fails_naming_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ray_private.ALLOW_UNTESTED_ENV, raising=False)
    series = ray_private.tested_ray_series()
    with pytest.raises(RayCompatError) as raised:
        ray_private.check_ray_version("2.99.1")
    message = str(raised.value)
    assert "Ray 2.99.1 is installed" in message
    assert f"tested with Ray {series}.x" in message
    assert ray_private.ALLOW_UNTESTED_ENV in message
    with pytest.raises(RayCompatError):
        ray_private.check_ray_version(series.split(".")[0] + "." + str(int(series.split(".")[1]) + 1) + ".0")


def test_an_untested_ray_can_be_let_through(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(ray_private.ALLOW_UNTESTED_ENV, "1")
    with caplog.at_level("WARNING", logger=ray_private.__name__):
        ray_private.check_ray_version("2.98.0")
    assert "Ray 2.98.0 is installed" in caplog.text


def test_a_missing_name_fails_naming_it_and_the_ray_version() -> None:
    with pytest.raises(RayCompatError, match=rf"Ray {re.escape(ray.__version__)} has no ray\._private\.worker\.no_such_name"):
        ray_private.private_name("ray._private.worker", "no_such_name")
    with pytest.raises(RayCompatError, match=r"has no module ray\._private\.no_such_module"):
        ray_private.private_name("ray._private.no_such_module", "anything")
    from ray.serve.llm.ingress import OpenAiIngress

    with pytest.raises(RayCompatError, match=r"OpenAiIngress\._no_such_method"):
        ray_private.private_member(OpenAiIngress, "_no_such_method")
    with pytest.raises(RayCompatError, match=r"argument '_no_such_argument' of ray\.serve\.deployment\.Deployment\.options"):
        from ray.serve.deployment import Deployment

        ray_private.private_argument(Deployment.options, "_no_such_argument")


def test_every_private_name_is_present_on_this_ray() -> None:
    ray_private.check_all(include_vllm_stage=True)  # imports the vLLM stage (vLLM, torch): seconds


def test_the_setup_hook_variable_is_rays() -> None:
    from prefect_rayllm.rayllm_stages.compat.engine_hooks import HOOK_ENV_VAR

    assert ray_private.worker_setup_hook_env_var() == HOOK_ENV_VAR


def test_code_version_pinning_reaches_the_deployment() -> None:
    from ray import serve

    @serve.deployment
    class Echo:
        def __call__(self) -> str:
            return "echo"

    pinned = ray_private.with_code_version(Echo, "v-1", user_config={"a": 1})
    assert pinned.version == "v-1"
    assert pinned.user_config == {"a": 1}


def test_openai_app_engines_are_pinned() -> None:
    from ray.serve.llm import LLMConfig, build_openai_app

    config = LLMConfig(model_loading_config={"model_id": "m", "model_source": "facebook/opt-125m"}, engine_kwargs={})
    app = ray_private.pin_openai_app_version(build_openai_app({"llm_configs": [config]}), "v-7")
    ingress = ray_private.private_member(app, "_bound_deployment")
    engines = ray_private.private_member(ingress, "_replica_config").init_kwargs["llm_deployments"]
    assert [ray_private.private_member(e, "_bound_deployment").version for e in engines.values()] == ["v-7"]
    assert ray_private.openai_model_card("m", config)["id"] == "m"


def test_the_routed_ingress_is_an_openai_ingress() -> None:
    from ray.serve.llm.ingress import OpenAiIngress

    routed = ray_private.version_routed_ingress()
    assert issubclass(routed, OpenAiIngress)
    assert {"serve_model", "chosen_route", "forward"} <= set(vars(routed))
    assert issubclass(ray_private.openai_http_exception(), Exception)
