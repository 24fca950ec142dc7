"""What each service's imports cost in resident memory: ``python -m bench.imports``.

Each service's ``app`` module is imported in a fresh interpreter with a hook around
``__import__`` that reads the process's RSS before and after every module's first import;
a module's own share is its growth less that of the modules it imported, summed by
top-level package (``aiohttp``, ``grpc``, ``sluice``, ...). RSS includes the pages of the
shared libraries each package maps (grpc's, OpenSSL's), which every process counts again.
Figures move by a MiB or so between runs; read the large ones.

``python -m bench.imports gateway cache`` for some services; ``--top N`` rows each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.report import table

SERVICES = ("gateway", "limiter", "cache", "inference_worker", "cost_tracker")

# Run in the child: prints {"base": MiB, "total": MiB, "modules": n, "by_package": {...}}.
_PROBE = r"""
import builtins, json, os, sys

PAGE = os.sysconf("SC_PAGE_SIZE") / 2**20

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

by_package = {}
stack = []
original = builtins.__import__

def measured(name, globals=None, locals=None, fromlist=(), level=0):
    if level or name in sys.modules:
        return original(name, globals, locals, fromlist, level)
    stack.append(0.0)
    before = rss()
    try:
        return original(name, globals, locals, fromlist, level)
    finally:
        grown = rss() - before
        children = stack.pop()
        top = name.split(".")[0]
        by_package[top] = by_package.get(top, 0.0) + grown - children
        if stack:
            stack[-1] += grown

base = rss()
builtins.__import__ = measured
__import__(sys.argv[1])
builtins.__import__ = original
print(json.dumps({"base": base, "total": rss(), "modules": len(sys.modules),
                  "by_package": by_package}))
"""


def measure(module: str) -> dict[str, object]:
    found = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    result: dict[str, object] = json.loads(found.stdout.strip().splitlines()[-1])
    return result


def report(services: list[str], top: int) -> None:
    summary: list[list[object]] = []
    for service in services:
        found = measure(f"services.{service}.app")
        base, total = float(found["base"]), float(found["total"])  # type: ignore[arg-type]
        by_package: dict[str, float] = found["by_package"]  # type: ignore[assignment]
        summary.append([service, base, total - base, total, found["modules"]])
        rows = sorted(by_package.items(), key=lambda item: -item[1])[:top]
        print(f"\nservices.{service}.app: RSS by top-level package (MiB, own share)")
        print(table(["package", "MiB"], [[name, mib] for name, mib in rows]))
    print("\nAfter importing each service's app module")
    print(table(["service", "interpreter MiB", "imports MiB", "RSS MiB", "modules"], summary))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.imports")
    parser.add_argument("services", nargs="*", help=f"some of {', '.join(SERVICES)} (all)")
    parser.add_argument("--top", type=int, default=15, help="packages listed per service (15)")
    args = parser.parse_args(argv)
    unknown = set(args.services) - set(SERVICES)
    if unknown:
        parser.error(f"not a service: {', '.join(sorted(unknown))}")
    report(args.services or list(SERVICES), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
