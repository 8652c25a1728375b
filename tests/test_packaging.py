"""What the code imports is what the package declares: every third-party module imported under
src/ comes from a distribution in ``[project.dependencies]`` (not only from a dev extra, and
not only as another package's dependency), so that ``pip install streamplane`` runs it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def _declared() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {_normal(re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0]) for d in deps}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _optional(node: ast.Try) -> bool:
    """A ``try`` whose handler takes ImportError: the import is optional (uvloop, ...)."""
    names = {"ImportError", "ModuleNotFoundError"}
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(k, ast.Name) and k.id in names for k in kinds):
            return True
    return False


def _imports(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """Top-level module names imported (or looked up by name) in ``tree``, with their line."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and _optional(node):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno
        elif (  # importlib.import_module("x") / importlib.util.find_spec("x")
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("import_module", "find_spec")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value.split(".")[0], node.lineno


def _third_party_imports() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        if "node_modules" in path.parts:
            continue
        for module, line in _imports(ast.parse(path.read_text(), str(path))):
            if module in sys.stdlib_module_names or module == "streamplane":
                continue
            found.setdefault(module, []).append(f"{path.relative_to(ROOT)}:{line}")
    return found


def test_every_imported_package_is_a_declared_dependency() -> None:
    declared = _declared()
    owners = importlib.metadata.packages_distributions()
    wrong = []
    for module, where in sorted(_third_party_imports().items()):
        dists = owners.get(module)
        if not dists:
            wrong.append(f"{module} (imported at {where[0]}) is installed by no distribution here")
        elif not any(_normal(d) in declared for d in dists):
            wrong.append(
                f"{module} (imported at {where[0]}) comes from {', '.join(dists)}, "
                "which [project.dependencies] in pyproject.toml does not list"
            )
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_what_it_must() -> None:
    found = _third_party_imports()
    # a plain import, a from-import, and a lookup by name
    assert {"fastapi", "httptools", "skvideo", "_maxminddb_geolite2"} <= set(found)
    tree = ast.parse("try:\n    import uvloop\nexcept ImportError:\n    pass\nimport a.b\n")
    assert [m for m, _ in _imports(tree)] == ["a"]
