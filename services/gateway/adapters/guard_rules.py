"""The input guard's rules from ``config/guard.yaml`` (or ``SLUICE_GATEWAY_GUARD_FILE``),
checked at start: a bad rule stops the gateway with a message naming it."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.gateway.domain.guard import Guard, parse_rules

GUARD_FILE = "guard.yaml"


def load_guard(path: Path | None, config_dir: Path) -> Guard:
    """The guard of ``path``, else of ``<config_dir>/guard.yaml`` when it exists, else
    one without rules (the image check of the catalogue still applies)."""
    chosen = path or config_dir / GUARD_FILE
    if path is None and not chosen.exists():
        return Guard()
    data = yaml.safe_load(chosen.read_text(encoding="utf-8"))
    return Guard(parse_rules(data, str(chosen.name)))
