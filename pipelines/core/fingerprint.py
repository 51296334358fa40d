"""Content fingerprints: what a cached result was made from.

`dvc.yaml` is the one declaration of each stage's inputs (deps and params). The training
flow keys its task cache on the same declaration, so "unchanged" means the same thing to
`dvc repro` and to `loopline train`: same input bytes, same params, same stage code.

A stage's code is found from the code itself (`code_files`), never from a list kept by hand:
dvc.yaml's code dependencies are checked against it by the tests, and the training
fingerprint hashes the code the candidate search runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError
from pipelines.core.storage import path_md5

PACKAGE = Path(__file__).resolve().parents[1]  # pipelines/
ROOT = PACKAGE.parent  # the repository root, which dvc.yaml's paths are relative to
# The params model. Stages and the search read params by value (dvc.yaml's `params:` keys,
# the training fingerprint's sections, defaults included), so the module that defines them is
# not their code: a new setting of another section changes none of their results. The params
# stage, which checks the whole file, is the one stage that runs it as code.
PARAMS_MODULE = "pipelines.core.config"
_VAR = re.compile(r"\$\{([^}]+)\}")


@dataclass(frozen=True)
class StageSpec:
    deps: list[Path]
    params: list[str]
    outs: list[Path]


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _params_tree(params: Params) -> dict[str, Any]:
    return params.model_dump(mode="json", by_alias=True)


def _entries(items: list) -> list[str]:
    """dvc.yaml lists entries as strings or as one-key mappings (a path with options)."""
    names: list[str] = []
    for item in items or []:
        names.extend(item if isinstance(item, dict) else [item])
    return names


def dvc_stage(stage: str, params: Params, dvc_yaml: str | Path = "dvc.yaml") -> StageSpec:
    """A stage of dvc.yaml with its ${...} references filled in from `params`."""
    path = Path(dvc_yaml)
    if not path.is_file():
        raise LooplineError("lineage", f"{path} not found; run loopline from the repository root")
    entry = yaml.safe_load(path.read_text())["stages"][stage]
    tree = _params_tree(params)

    def fill(text: str) -> str:
        return _VAR.sub(lambda m: str(_lookup(tree, m.group(1))), text)

    outs = [Path(fill(o)) for key in ("outs", "metrics", "plots") for o in _entries(entry.get(key))]
    return StageSpec(
        deps=[Path(fill(d)) for d in entry.get("deps", [])], params=list(entry.get("params", [])), outs=outs
    )


def fingerprint(deps: list[Path], param_keys: list[str], params: Params, salt: str = "") -> str:
    """A hash of the input files' bytes (directories: every file below) and the named params values."""
    tree = _params_tree(params)
    digest = hashlib.sha256(salt.encode())
    for dep in deps:
        digest.update(f"{dep}:{path_md5(dep)}\n".encode())
    for key in param_keys:
        digest.update(f"{key}={json.dumps(_lookup(tree, key), sort_keys=True)}\n".encode())
    return digest.hexdigest()


def _source(module: str) -> Path | None:
    """A pipelines module's file, relative to the repository root (None: not a module file;
    a package's __init__ only names the part)."""
    path = Path(*module.split(".")).with_suffix(".py")
    return path if module.split(".")[0] == PACKAGE.name and (ROOT / path).is_file() else None


def _walk(node: ast.AST):
    """ast.walk, less what only a type checker reads (`if TYPE_CHECKING:` blocks)."""
    todo = [node]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not (
                isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING"
            ):
                todo.append(child)


def _imported(node: ast.AST) -> list[str]:
    """The pipelines modules an import statement may load (`from pipelines.core import names`
    loads pipelines.core.names)."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE.name:
        return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE.name]
    return []


def code_files(target: str, skip: tuple[str, ...] = ()) -> list[Path]:
    """The source files that `target` runs, found from the code itself:
    - a module ("pipelines.training.search"): its file and every pipelines module it imports,
      at the top or inside a function, directly or through others;
    - one function of a module ("pipelines.data.stages:clean"): the module's file, its
      top-level imports, and the imports inside that function and inside the functions of
      the same module it calls; then every module those import, as above.
    Modules in `skip` are neither listed nor followed. Paths are relative to the repository
    root, as dvc.yaml's are."""
    module, _, function = target.partition(":")
    first = _source(module)
    if first is None:
        raise LooplineError("fingerprint", f"{target}: {module} is not a module of {PACKAGE}")
    found: dict[str, Path] = {}  # modules read whole
    todo = [module]
    if function:
        tree = ast.parse((ROOT / first).read_text())
        functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        if function not in functions:
            raise LooplineError("fingerprint", f"{target}: {module} defines no function {function}")
        todo = [m for statement in tree.body for m in _imported(statement)]
        called, pending = set(), [function]
        while pending:
            name = pending.pop()
            if name in called:
                continue
            called.add(name)
            for node in _walk(functions[name]):
                todo += _imported(node)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in functions:
                    pending.append(node.func.id)
    while todo:
        name = todo.pop()
        path = _source(name)
        if name in found or path is None or name in skip:
            continue
        found[name] = path
        for node in _walk(ast.parse((ROOT / path).read_text())):
            todo += _imported(node)
    return sorted({first, *found.values()})


def stage_code(stage: str) -> list[Path]:
    """The code of a dvc.yaml stage: its function's (pipelines.core.stages) and what that
    imports; dvc.yaml lists exactly these files as the stage's code dependencies (tested)."""
    from pipelines.core.stages import STAGES

    return code_files(STAGES[stage], skip=() if stage == "params" else (PARAMS_MODULE,))


def stage_fingerprint(stage: str, params: Params, dvc_yaml: str | Path = "dvc.yaml") -> str:
    """Fingerprint of a dvc.yaml stage's inputs."""
    spec = dvc_stage(stage, params, dvc_yaml)
    return fingerprint(spec.deps, spec.params, params, salt=stage)


def stage_outputs_exist(stage: str, params: Params, dvc_yaml: str | Path = "dvc.yaml") -> bool:
    """False when an output was deleted: a cached result must not stand in for it then."""
    return all(out.exists() for out in dvc_stage(stage, params, dvc_yaml).outs)
