"""``sluice up [options]``: the options, and the supervisor run in this process."""

from __future__ import annotations

import argparse
import os

from sluice.devtools.up.supervisor import Supervisor

DEFAULT_STATE_DIR = ".sluice"
DEFAULT_CONFIG_DIR = "config"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sluice up",
        description="Start NATS, the local model and the five Sluice services, and supervise "
        "them until Ctrl-C. Ports and addresses come from SLUICE_* environment variables.",
    )
    parser.add_argument(
        "--state-dir",
        default=os.environ.get("SLUICE_STATE_DIR") or DEFAULT_STATE_DIR,
        help="local state: JetStream store, logs, spans, ledger, dev key "
        "(default: $SLUICE_STATE_DIR or .sluice)",
    )
    parser.add_argument(
        "--config-dir",
        default=os.environ.get("SLUICE_CONFIG_DIR") or DEFAULT_CONFIG_DIR,
        help="providers.yaml and prices.yaml (default: $SLUICE_CONFIG_DIR or config)",
    )
    parser.add_argument(
        "--no-model", action="store_true", help="do not start the local model server"
    )
    parser.add_argument(
        "--models-dir",
        default=None,
        help="where the assembled model file lives (default: <state-dir>/models)",
    )
    parser.add_argument(
        "--simulator",
        action="store_true",
        help="also start the simulated provider (port $SLUICE_SIM_PORT or 8090)",
    )
    parser.add_argument(
        "--ready-timeout", type=float, default=120.0, help="seconds to wait for the services"
    )
    parser.add_argument(
        "--model-timeout", type=float, default=300.0, help="seconds to wait for llama-server"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    return Supervisor(parse_args(argv)).run()
