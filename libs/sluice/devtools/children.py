"""How the local tools start the processes they own (``sluice up``'s NATS, model server,
simulator and services; the tests' servers)."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1


def set_parent_death_signal() -> None:
    """Linux: receive SIGTERM when the parent dies (run in the child before exec)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def owned_child_options() -> dict[str, Any]:
    """``subprocess.Popen`` options for a child this process owns and stops itself.

    A session of its own: a terminal's Ctrl-C goes to the foreground process group, so it
    reaches the owner alone, which stops its children in order (the services drain
    while NATS still runs). On Linux, SIGTERM when the owner dies: an owner killed
    outright (SIGKILL, a crash) leaves no orphans. The death signal follows the thread
    that started the child, so start owned children from a thread that lives as long as
    the owner (the main thread)."""
    return {
        "start_new_session": True,
        "preexec_fn": set_parent_death_signal if sys.platform == "linux" else None,
    }
