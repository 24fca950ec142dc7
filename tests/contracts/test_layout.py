"""The repository's shape: one folder per service with its entry point and settings,
no service importing another, and shared code never importing a service."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from sluice.launcher import SERVICE_MODULES
from sluice.topology import ALL_SERVICES, ServiceName

REPO = Path(__file__).resolve().parents[2]
SERVICE_PACKAGES = {name: module.split(".")[1] for name, module in SERVICE_MODULES.items()}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "libs":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target
            # ``from services import limiter`` names a service package too.
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def service_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "services":
        return parts[1]
    return None


@pytest.mark.parametrize("name", ALL_SERVICES, ids=str)
def test_service_folder_has_entry_point_and_settings(name: ServiceName) -> None:
    folder = REPO / "services" / SERVICE_PACKAGES[name]
    for required in ("__init__.py", "__main__.py", "settings.py"):
        assert (folder / required).is_file(), f"services/{folder.name}/{required} is missing"


def test_no_service_imports_another() -> None:
    packages = set(SERVICE_PACKAGES.values())
    violations: list[str] = []
    for package in sorted(packages):
        for path in sorted((REPO / "services" / package).rglob("*.py")):
            for line, module in imported_modules(path):
                other = service_of(module)
                if other is not None and other != package and other in packages:
                    violations.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not violations, "services talk over NATS, not imports:\n" + "\n".join(violations)


def test_shared_code_does_not_import_services() -> None:
    violations = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sorted((REPO / "libs" / "sluice").rglob("*.py"))
        for line, module in imported_modules(path)
        if module == "services" or module.startswith("services.")
    ]
    assert not violations, "libs/sluice is shared by every service:\n" + "\n".join(violations)
