"""The Python client (``clients/python``) stands alone: it imports only the standard
library, its two declared dependencies (httpx, pydantic) and itself, never Sluice's
own code, so that it installs and runs anywhere the gateway's HTTP API is reachable."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

from tests.contracts.test_dependencies import requirement_name

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "clients" / "python"
ALLOWED = {"httpx", "pydantic", "sluice_client"}


def imported_tops(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    tops: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops - {"__future__"} - set(sys.stdlib_module_names)


def test_the_client_imports_only_its_declared_dependencies() -> None:
    sources = sorted((CLIENT / "src" / "sluice_client").rglob("*.py"))
    assert sources
    problems = {
        str(path.relative_to(REPO)): sorted(imported_tops(path) - ALLOWED) for path in sources
    }
    assert not {k: v for k, v in problems.items() if v}


def test_the_client_declares_httpx_and_pydantic_and_ships_its_types() -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "sluice-client"
    assert {requirement_name(r) for r in project["dependencies"]} == {"httpx", "pydantic"}
    assert (CLIENT / "src" / "sluice_client" / "py.typed").exists()
