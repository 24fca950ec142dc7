"""Sluice shared code: contracts (generated, under ``sluice.<area>.v1``) and the small
runtime every service shares (bus, telemetry, settings, errors, service lifecycle)."""

__version__ = "0.1.0"
