"""The launcher's own process: it forks the supervisor into a session of its own and
forwards signals to it.

This process stays up as long as the product, doing nothing but wait, so it imports
nothing beyond the standard library: the supervisor loads its modules after the fork,
in its own process, and this one stays the size of a bare interpreter.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import traceback
from collections.abc import Callable
from types import FrameType

PR_SET_PDEATHSIG = 1


def set_parent_death_signal() -> None:
    """Linux: receive SIGTERM when the parent dies, so a killed launcher leaves no orphans."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def run_in_own_session(body: Callable[[], int]) -> int:
    """Run ``body`` in a forked child that leads a new session, and forward signals to it.

    Terminal signals (Ctrl-C) then reach this process only; it passes them on to the
    supervisor, which stops its children in order.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the supervisor
        code = 1
        try:
            os.setsid()
            if sys.platform == "linux":
                set_parent_death_signal()
            # The parent may have died before the death signal was set.
            code = body() if os.getppid() == parent else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def forward(signum: int, _frame: FrameType | None) -> None:
        # The supervisor stops in order on the first signal and hurries on the next.
        sig = signum if signum in (signal.SIGINT, signal.SIGTERM) else signal.SIGTERM
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    _, status = os.waitpid(pid, 0)
    return _exit_code(status)
