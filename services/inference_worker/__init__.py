"""The inference worker: pulls work from SLUICE_INFER, calls providers, streams events."""
