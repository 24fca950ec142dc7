"""The repository's shape, as docs/architecture.md ("The service template") writes it:

- one folder per service with its entry point, wiring, settings and README;
- inside, only three kinds of code beside those: ``handlers`` (one module or package per
  transport: ``http``, ``nats``, ``grpc``), ``domain`` (the logic, free of transports)
  and ``adapters`` (KV, streams, object store, Qdrant, SQL, providers, other services);
- each transport library imported only by its own handlers (and its adapters, for the
  client side of NATS); the domain imports no transport, no I/O client and no handler;
- service code reaches NATS through ``sluice.bus.Bus`` and never past it (``bus.nc``,
  ``bus.js``);
- no service imports another, and shared code never imports a service.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from sluice.topology import ALL_SERVICES, SERVICE_PACKAGES, ServiceName

REPO = Path(__file__).resolve().parents[2]

REQUIRED = ("__init__.py", "__main__.py", "app.py", "settings.py", "README.md")
LAYERS = frozenset({"handlers", "domain", "adapters"})
TRANSPORTS = frozenset({"http", "nats", "grpc"})

# Top-level packages by what they are.
TRANSPORT_LIBS = {
    # The MCP SDK (and the Starlette it serves with) is an HTTP transport: /mcp.
    "http": frozenset({"litestar", "granian", "uvicorn", "mcp", "mcp_types", "starlette"}),
    "grpc": frozenset({"grpc", "grpc_health"}),
    "nats": frozenset({"faststream"}),
}
NATS_CLIENT = frozenset({"nats"})
IO_CLIENTS = frozenset(
    {"aiohttp", "httpx", "qdrant_client", "sqlite3", "aiosqlite", "asyncpg", "psycopg"}
)
ALL_TRANSPORT_LIBS = frozenset().union(*TRANSPORT_LIBS.values())
# Shared runtime modules that are transports in all but name.
RUNTIME_TRANSPORTS = frozenset(
    {"sluice.bus", "sluice.service", "sluice.grpc_edge", "sluice.consumers"}
)


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


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def service_files(package: str) -> list[Path]:
    return sorted((REPO / "services" / package).rglob("*.py"))


def layer_of(path: Path) -> tuple[str, str | None]:
    """(layer, transport) of a service module: layer is one of ``LAYERS``, or the file's
    own name for the files every service has (``app``, ``settings``, ...)."""
    rel = path.relative_to(REPO / "services").parts[1:]
    head = rel[0].removesuffix(".py")
    if head == "handlers" and len(rel) > 1:
        return head, rel[1].removesuffix(".py")
    return head, None


SERVICES = [(name, SERVICE_PACKAGES[name]) for name in ALL_SERVICES]
IDS = [str(name) for name in ALL_SERVICES]


@pytest.mark.parametrize(("name", "package"), SERVICES, ids=IDS)
def test_service_folder_has_the_template_files(name: ServiceName, package: str) -> None:
    folder = REPO / "services" / package
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    assert not missing, f"services/{package} lacks {', '.join(missing)}"


@pytest.mark.parametrize(("name", "package"), SERVICES, ids=IDS)
def test_service_holds_only_handlers_domain_and_adapters(name: ServiceName, package: str) -> None:
    folder = REPO / "services" / package
    strays = []
    for entry in sorted(folder.iterdir()):
        if entry.name in REQUIRED or entry.name == "__pycache__":
            continue
        stem = entry.name.removesuffix(".py")
        if stem not in LAYERS or (stem == "handlers" and not entry.is_dir()):
            strays.append(entry.name)
    handlers = folder / "handlers"
    if handlers.is_dir():
        for entry in sorted(handlers.iterdir()):
            if entry.name in ("__init__.py", "__pycache__"):
                continue
            if entry.name.removesuffix(".py") not in TRANSPORTS:
                strays.append(f"handlers/{entry.name}")
    assert not strays, (
        f"services/{package}: {', '.join(strays)} fit no part of the service template "
        "(handlers/<http|nats|grpc>, domain, adapters; see docs/architecture.md)"
    )


def _forbidden(layer: str, transport: str | None, own: str) -> list[tuple[str, str]]:
    """(module prefix, why) pairs a module of this layer must not import."""
    rules: list[tuple[str, str]] = []
    own_handlers = f"services.{own}.handlers"
    own_adapters = f"services.{own}.adapters"
    own_app = f"services.{own}.app"
    if layer == "domain":
        for lib in sorted(ALL_TRANSPORT_LIBS | NATS_CLIENT | IO_CLIENTS):
            rules.append((lib, "a domain module imports no transport or I/O client"))
        for mod in sorted(RUNTIME_TRANSPORTS):
            rules.append((mod, "a domain module imports no transport"))
        rules += [
            (own_handlers, "the domain does not know its handlers"),
            (own_adapters, "the domain reaches adapters through the protocols it defines"),
            (own_app, "the domain does not know its wiring"),
        ]
    elif layer == "adapters":
        for lib in sorted(ALL_TRANSPORT_LIBS):
            rules.append((lib, "adapters are clients, not servers"))
        rules += [
            (own_handlers, "adapters do not know the handlers"),
            (own_app, "adapters do not know their wiring"),
        ]
    elif layer == "handlers":
        assert transport is not None
        for kind, libs in TRANSPORT_LIBS.items():
            if kind != transport:
                for lib in sorted(libs):
                    rules.append((lib, f"only handlers/{kind} speaks {kind}"))
        if transport != "nats":
            rules.append(("nats", "only NATS handlers and adapters touch nats-py"))
            rules.append(("sluice.bus", "only NATS handlers and adapters hold the bus"))
        for other in sorted(TRANSPORTS - {transport}):
            why = "one transport's handlers never call another's"
            rules.append((f"{own_handlers}.{other}", why))
        rules.append((own_app, "handlers do not know their wiring"))
    elif layer in ("app", "__main__", "settings"):
        for lib in sorted(ALL_TRANSPORT_LIBS | NATS_CLIENT):
            rules.append((lib, f"{layer}.py wires handlers; it speaks no transport itself"))
    return rules


@pytest.mark.parametrize(("name", "package"), SERVICES, ids=IDS)
def test_each_layer_imports_only_what_it_may(name: ServiceName, package: str) -> None:
    violations: list[str] = []
    for path in service_files(package):
        layer, transport = layer_of(path)
        if layer == "__init__":
            continue
        rules = _forbidden(layer, transport, package)
        for line, module in imported_modules(path):
            for prefix, why in rules:
                if _within(module, prefix):
                    violations.append(f"{path.relative_to(REPO)}:{line} imports {module}: {why}")
                    break
    assert not violations, "\n".join(sorted(set(violations)))


@pytest.mark.parametrize(("name", "package"), SERVICES, ids=IDS)
def test_service_code_never_reaches_past_the_bus(name: ServiceName, package: str) -> None:
    """``Bus`` is the one way to NATS: it carries trace context, names spans and keeps
    every subject in ``sluice.topology``. ``bus.nc`` and ``bus.js`` bypass all three."""
    violations: list[str] = []
    for path in service_files(package):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("nc", "js"):
                violations.append(f"{path.relative_to(REPO)}:{node.lineno} uses .{node.attr}")
    assert not violations, "use a Bus method instead:\n" + "\n".join(violations)


def test_no_service_imports_another() -> None:
    packages = set(SERVICE_PACKAGES.values())
    violations: list[str] = []
    for package in sorted(packages):
        for path in service_files(package):
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


def test_the_runtime_does_not_import_the_devtools() -> None:
    """Services import the runtime (``sluice.*``); the launcher, simulator, trace reader
    and local model (``sluice.devtools``) run beside them and are never imported by them
    or by the runtime."""
    violations: list[str] = []
    runtime = [
        p
        for p in sorted((REPO / "libs" / "sluice").rglob("*.py"))
        if "devtools" not in p.relative_to(REPO / "libs" / "sluice").parts
    ]
    for path in [*runtime, *sorted((REPO / "services").rglob("*.py"))]:
        for line, module in imported_modules(path):
            if _within(module, "sluice.devtools"):
                violations.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not violations, "\n".join(violations)

