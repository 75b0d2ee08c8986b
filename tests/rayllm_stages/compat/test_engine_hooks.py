"""The engine stage's setup hook (rayllm_stages.compat.engine_hooks): wiring and what it changes."""

from __future__ import annotations

from prefect_rayllm.rayllm_stages.compat.engine_hooks import HOOK, HOOK_ENV_VAR, final_only, with_engine_hook


def test_hook_reaches_only_the_engine_stage():
    options = {
        "runtime_env": {"env_vars": {"A": "1"}},
        "chat_template_stage": {"num_cpus": 0.25},
        "tokenize_stage": {"num_cpus": 0.25, "runtime_env": {"env_vars": {"B": "2"}}},
        "detokenize_stage": True,
    }
    hooked = with_engine_hook(options)
    assert hooked["runtime_env"] == {"env_vars": {"A": "1", HOOK_ENV_VAR: HOOK}}
    assert hooked["chat_template_stage"] == {"num_cpus": 0.25, "runtime_env": {"env_vars": {"A": "1"}}}
    assert hooked["tokenize_stage"]["runtime_env"] == {"env_vars": {"B": "2"}}  # the user's, untouched
    assert hooked["detokenize_stage"] is True
    assert options["runtime_env"] == {"env_vars": {"A": "1"}}  # the input is not changed


def test_a_users_own_setup_hook_wins():
    options = {"runtime_env": {"worker_process_setup_hook": "mine.setup"}}
    assert with_engine_hook(options) is options
    no_env = with_engine_hook({})
    assert no_env["runtime_env"] == {"env_vars": {HOOK_ENV_VAR: HOOK}}


def test_final_only_for_single_sequences():
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=8)
    final_only(params)
    assert params.output_kind == RequestOutputKind.FINAL_ONLY
    streamed = SamplingParams(max_tokens=8, output_kind=RequestOutputKind.DELTA)
    final_only(streamed)
    assert streamed.output_kind == RequestOutputKind.DELTA
    final_only({"max_tokens": 8})  # not a SamplingParams (pooling): left alone
