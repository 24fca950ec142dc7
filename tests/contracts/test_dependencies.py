"""Everything the code imports is declared in pyproject.toml, so that a clean clone's
``make install`` gives a working product: runtime code (libs/, services/) against the
dependencies, tests and tools against the dependencies plus the ``dev`` extra.

A module counts as declared when the distribution that installs it is listed, or is a
direct requirement of a listed one (``opentelemetry.trace`` comes with
``opentelemetry-sdk``). Imports guarded by ``try: ... except ImportError`` are optional
by construction and skipped.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import re
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"sluice", "services", "tests", "bench"}
RUNTIME_DIRS = ("libs/sluice", "services")
DEV_DIRS = ("tests", "bench", "deploy/docker")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return normalize(match.group(1))


@cache
def declared() -> tuple[frozenset[str], frozenset[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {requirement_name(r) for r in project["dependencies"]}
    dev = {requirement_name(r) for r in project["optional-dependencies"]["dev"]}
    return frozenset(runtime), frozenset(runtime | dev)


@cache
def file_owners() -> dict[Path, str]:
    owners: dict[Path, str] = {}
    for dist in md.distributions():
        name = normalize(dist.metadata["Name"])
        for file in dist.files or []:
            owners[Path(str(dist.locate_file(file))).resolve()] = name
    return owners


def accepted(names: frozenset[str]) -> frozenset[str]:
    """The declared distributions and their direct requirements."""
    result = set(names)
    for name in names:
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        # Requirements behind an extra ("; extra == 'standard'") are not installed with it.
        result |= {requirement_name(r) for r in requires if "extra ==" not in r}
    return frozenset(result)


def guarded_by_import_error(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    current = node
    while current in parents:
        parent = parents[current]
        if isinstance(parent, ast.Try) and current in parent.body:
            for handler in parent.handlers:
                caught = handler.type
                names = (
                    ([caught] if not isinstance(caught, ast.Tuple) else list(caught.elts))
                    if caught is not None
                    else []
                )
                if any(
                    isinstance(n, ast.Name) and n.id in {"ImportError", "ModuleNotFoundError"}
                    for n in names
                ):
                    return True
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test):
            return True
        current = parent
    return False


def third_party_imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, imported names) of unguarded absolute third-party imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        modules: list[tuple[str, list[str]]]
        if isinstance(node, ast.Import):
            modules = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [(node.module, [a.name for a in node.names])]
        else:
            continue
        for module, names in modules:
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in FIRST_PARTY or top == "__future__":
                continue
            if guarded_by_import_error(node, parents):
                continue
            yield node.lineno, module, names


def owning_distributions(module: str, names: list[str]) -> set[str] | None:
    """Distributions whose files provide ``module`` (or, for a namespace package, the
    imported submodules); None when it is not installed at all."""
    try:
        spec = importlib.util.find_spec(module)
    except (ModuleNotFoundError, ValueError):
        return None
    if spec is None:
        return None
    owners = file_owners()
    if spec.origin is not None and spec.has_location:
        owner = owners.get(Path(spec.origin).resolve())
        return {owner} if owner else set()
    found: set[str] = set()
    for name in names:
        try:
            sub = importlib.util.find_spec(f"{module}.{name}")
        except (ModuleNotFoundError, ValueError):
            sub = None
        if sub is not None and sub.origin is not None:
            owner = owners.get(Path(sub.origin).resolve())
            if owner:
                found.add(owner)
    return found


def undeclared(dirs: tuple[str, ...], allowed: frozenset[str]) -> list[str]:
    problems: list[str] = []
    for folder in dirs:
        for path in sorted((REPO / folder).rglob("*.py")):
            for line, module, names in third_party_imports(path):
                where = f"{path.relative_to(REPO)}:{line} imports {module}"
                owners = owning_distributions(module, names)
                if owners is None:
                    problems.append(f"{where}, which is not installed")
                elif owners and not owners & allowed:
                    problems.append(f"{where} from {sorted(owners)}, not declared")
    return problems


@pytest.mark.parametrize(
    ("dirs", "extra"),
    [(RUNTIME_DIRS, "dependencies"), (DEV_DIRS, "dev extra")],
    ids=["runtime", "dev"],
)
def test_imports_are_declared(dirs: tuple[str, ...], extra: str) -> None:
    runtime, dev = declared()
    allowed = accepted(runtime if dirs == RUNTIME_DIRS else dev)
    problems = undeclared(dirs, allowed)
    assert not problems, f"add to pyproject.toml ({extra}):\n" + "\n".join(problems)
