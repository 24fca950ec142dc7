"""``python -m services.cost_tracker [--rebuild]``."""

from sluice.service import run_service

from services.cost_tracker.app import main

run_service(main)
