"""The one place where this package touches Ray's private names.

Ray offers no public API for a few things this package needs (a Serve deployment's code version,
the worker output stream, the OpenAI ingress's per-request handle choice, ...). Each such use lives
here, in `ray_private` (and `engine_hooks`, which patches Ray Data LLM's vLLM stage), and nowhere
else: a test fails on a private Ray name anywhere outside this package. Every name is checked
against the installed Ray on first use: an untested Ray version, or a name that is gone, fails at
once with a `RayCompatError` naming both, instead of breaking later in some other way.
"""

from prefect_rayllm.rayllm_stages.compat.ray_private import (
    RayCompatError,
    check_ray_version,
    installed_ray_version,
    tested_ray_series,
)

__all__ = ["RayCompatError", "check_ray_version", "installed_ray_version", "tested_ray_series"]
