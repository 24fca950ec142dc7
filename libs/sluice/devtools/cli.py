"""The ``sluice`` command: ``up`` (everything, locally), ``trace`` (one request as a
tree), ``usage`` (where the money goes), ``simulator`` (the fault-injecting provider),
``teams``, ``keys`` and ``audit`` (the gateway's admin API)."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("sluice.devtools.up.command", "start NATS, the local model and all five services"),
    "trace": ("sluice.devtools.tracecli", "print one request's spans as a tree"),
    "usage": ("sluice.devtools.usagecli", "cost, tokens and cache savings, grouped"),
    "simulator": ("sluice.devtools.simulator", "run the simulated OpenAI-compatible provider"),
    "teams": ("sluice.devtools.admin:main_teams", "create, list, show, update teams"),
    "keys": ("sluice.devtools.admin:main_keys", "create, list, show, rotate, revoke API keys"),
    "audit": ("sluice.devtools.admin:main_audit", "read the audit trail"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"} or args[0] not in COMMANDS:
        print("usage: sluice <command> [options]\n\ncommands:")
        for name, (_module, summary) in COMMANDS.items():
            print(f"  {name:<10} {summary}")
        return 0 if args and args[0] in {"-h", "--help", "help"} else 2
    target = COMMANDS[args[0]][0]
    # "module:function", or a module with main().
    module_name, _, function = target.partition(":")
    module = importlib.import_module(module_name)
    result: int = getattr(module, function or "main")(args[1:])
    return result


if __name__ == "__main__":
    sys.exit(main())
