"""No private Ray or Prefect name outside `rayllm_stages/compat/`: each breaks silently on an upgrade.

The package's code is read (AST), not imported: imports of `ray.*._private` / `ray.*._internal`
modules (and of any `_name` from a `ray` or `prefect` module), such module paths as strings
(`importlib.import_module("ray.llm._internal...")`), `_name` attributes of names bound to Ray or
Prefect, private keyword arguments (`_internal=True`, `_blocking=...`), and, in classes that
subclass a Ray or Prefect class, `self._name` members the class does not define itself.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re

from conftest import REPO

SCANNED = ("flows", "tasks", "rayllm_stages", "deployments")
ALLOWED = REPO / "rayllm_stages" / "compat"
FOREIGN = ("ray", "prefect")
PRIVATE_KEYWORDS = {"_internal", "_blocking", "_init_kwargs", "_local_testing_mode"}
PRIVATE_MODULE_STRING = re.compile(r"^(ray|prefect)(\.\w+)*\.(_(?!_)\w*)(\.\w+)*$")
# Private members of Ray and Prefect objects this code once used, caught on any object.
KNOWN_PRIVATE_MEMBERS = {
    "_bound_deployment",
    "_replica_config",
    "_get_configured_serve_handle",
    "_process_llm_request",
    "_model_cards",
    "_lora_paths",
    "_configured_serve_handles",
    "_instances",
    "_global_node",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _foreign(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in FOREIGN  # type: ignore[union-attr]


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def private_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for each private Ray or Prefect name `source` uses."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local names bound to Ray or Prefect modules and objects -> "ray" / "prefect"
    origins: dict[str, tuple[str, str]] = {}  # name imported from a Ray module -> (module, name)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _foreign(alias.name):
                    bound[(alias.asname or alias.name).split(".")[0]] = alias.name.split(".")[0]
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and _foreign(node.module):
            module = node.module or ""
            if any(_private(part) for part in module.split(".")):
                found.append((node.lineno, f"from {module} import ..."))
            for alias in node.names:
                bound[alias.asname or alias.name] = module.split(".")[0]
                if module.split(".")[0] == "ray":
                    origins[alias.asname or alias.name] = (module, alias.name)
                if _private(alias.name):
                    found.append((node.lineno, f"from {module} import {alias.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and PRIVATE_MODULE_STRING.match(node.value):
            found.append((node.lineno, f"module path {node.value!r}"))
        elif (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and (_root(node) in bound or node.attr in KNOWN_PRIVATE_MEMBERS)
        ):
            found.append((node.lineno, f"{ast.unparse(node)}"))
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg in PRIVATE_KEYWORDS or (keyword.arg and _private(keyword.arg) and _root(node.func) in bound):
                    found.append((node.lineno, f"{keyword.arg}= in {ast.unparse(node.func)}(...)"))
        elif isinstance(node, ast.ClassDef) and any(_root(base) in bound for base in node.bases):
            found += _inherited_private_members(node)
            for base in node.bases:
                if isinstance(base, ast.Name) and base.id in origins:
                    found += _private_overrides(node, *origins[base.id])
    return sorted(set(found))


def _inherited_private_members(cls: ast.ClassDef) -> list[tuple[int, str]]:
    """`self._name` in a subclass of a Ray or Prefect class where the class never defines `_name`."""
    own = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name):
                own.add(target.id)
            elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                own.add(target.attr)
            elif isinstance(target, ast.Tuple):
                own.update(e.attr for e in target.elts if isinstance(e, ast.Attribute))
    return [
        (node.lineno, f"self.{node.attr} inherited by {cls.name}")
        for node in ast.walk(cls)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and _private(node.attr)
        and node.attr not in own
    ]


def _ray_members(module: str, name: str) -> set[str]:
    """The private members (methods, and `self._x` state its code sets) of Ray's class `module.name`."""
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return set()
    if not isinstance(cls, type):
        return set()
    members = {m for m in dir(cls) if _private(m)}
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] == "ray":
            try:
                members |= {m for m in re.findall(r"self\.(_\w+)", inspect.getsource(klass)) if _private(m)}
            except (OSError, TypeError):
                pass
    return members


def _private_overrides(cls: ast.ClassDef, module: str, name: str) -> list[tuple[int, str]]:
    """Private members of Ray's class `module.name` that its subclass `cls` overrides or sets."""
    theirs = _ray_members(module, name)
    found = [
        (n.lineno, f"{cls.name}.{n.name} overrides Ray's private {n.name}")
        for n in cls.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in theirs
    ]
    for node in ast.walk(cls):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and node.attr in theirs
        ):
            found.append((node.lineno, f"self.{node.attr} (Ray's private state) set by {cls.name}"))
    return found


def test_no_private_ray_or_prefect_name_outside_compat() -> None:
    offenders = []
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            if ALLOWED in path.parents:
                continue
            for line, what in private_uses(path.read_text()):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert offenders == [], "private Ray/Prefect names belong in rayllm_stages/compat/:\n" + "\n".join(offenders)


def test_the_scan_finds_each_kind() -> None:
    source = """
import importlib
import ray._private.worker
from ray.serve import api as serve_api
from ray.serve.context import _get_global_client
from ray.llm._internal.serve.utils.broadcast import broadcast
from ray.serve.llm.ingress import OpenAiIngress
from prefect.server.api.server import SubprocessASGIServer

importlib.import_module("ray.llm._internal.batch.stages.vllm_engine_stage")
serve_api._run(app, _blocking=False)
deployment.options(version="v", _internal=True)
SubprocessASGIServer._instances.get(None)

class Router(OpenAiIngress):
    def __init__(self):
        self._mine = 1

    def _get_configured_serve_handle(self, model_id):
        self._model_cards = {}

    def route(self):
        return self._mine, self._process_llm_request()
"""
    found = {what for _, what in private_uses(source)}
    assert found == {
        "import ray._private.worker",
        "from ray.serve.context import _get_global_client",
        "from ray.llm._internal.serve.utils.broadcast import ...",
        "module path 'ray.llm._internal.batch.stages.vllm_engine_stage'",
        "serve_api._run",
        "_blocking= in serve_api._run(...)",
        "_internal= in deployment.options(...)",
        "SubprocessASGIServer._instances",
        "self._process_llm_request",
        "self._process_llm_request inherited by Router",
        "Router._get_configured_serve_handle overrides Ray's private _get_configured_serve_handle",
        "self._model_cards (Ray's private state) set by Router",
        "self._model_cards",
    }


def test_public_names_pass() -> None:
    source = '''
from ray import serve
from ray.serve.llm.openai_api_models import ChatCompletionRequest

serve.run_many([serve.RunTarget(app, name="a")], wait_for_applications_running=False)
serve.delete("a")
own._helper(x, _flag=True)
"""Importing `ray.llm._internal.serve` in prose is fine."""
'''
    assert private_uses(source) == []
