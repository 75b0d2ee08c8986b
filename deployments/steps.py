"""prefect.yaml steps of this package.

`pull_code` is the deployments' pull step: it runs in the flow-run process before the flow is
loaded, and puts the code it runs in the working directory. A local checkout (`checkout`, from
`$RAYLLM_CHECKOUT` in prefect.yaml) wins: Prefect's `set_working_directory`. Otherwise Prefect's
`git_clone` clones `repository` at `branch` (or `commit_sha`) and the run works in the clone.
With neither, the run uses the installed package (this step is part of it) in the worker's
working directory.
"""

from __future__ import annotations

import os
from typing import Any

from prefect.deployments.steps import git_clone, set_working_directory


def pull_code(
    checkout: str | None = None,
    repository: str | None = None,
    branch: str | None = None,
    commit_sha: str | None = None,
    access_token: str | None = None,
    credentials: Any = None,
) -> dict[str, str]:
    """Work in a local checkout, or in a fresh git clone of the repository.

    Args:
        checkout: A folder holding this repository (single machine, CI, tests). Wins when set.
        repository: Git URL to clone when there is no checkout (https, ssh, or a local path).
        branch: Branch to clone (default: the repository's default branch).
        commit_sha: Exact commit to clone instead of a branch head.
        access_token: Token for a private repository (e.g. `{{ prefect.blocks.secret.git-token }}`).
        credentials: A GitHub/GitLab/BitBucket credentials block, as for `git_clone`.

    Returns:
        `{"directory": <folder the flow runs in>}` (usable as `{{ <step id>.directory }}`).
    """
    if checkout:
        set_working_directory(checkout)
        return {"directory": checkout}
    if not repository:
        return {"directory": os.getcwd()}  # the installed package; relative paths from where the worker runs
    cloned = git_clone(
        repository=repository,
        branch=branch or None,
        commit_sha=commit_sha or None,
        access_token=access_token or None,
        credentials=credentials,
    )
    set_working_directory(cloned["directory"])  # type: ignore[index]
    return cloned  # type: ignore[return-value]
