"""What a message handler says about a message: by the exception it raises.

A durable consumer (``sluice.consumers``) settles every message by one rule:

- the handler returns: the message is done, and acknowledged;
- it raises ``Poison``: the message can never succeed (undecodable, invalid), and is
  terminated, so JetStream never delivers it again;
- it raises ``Transient``: the message could succeed later (a store unavailable, a
  commit that failed), and is handed back to be delivered again after ``delay`` seconds.

Any other exception is a bug: the consumer logs it with its traceback and treats it as
``Transient`` with its default delay, because a fix can still process the message
(the consumer's ``max_deliver`` bounds the attempts) and a terminated one is lost.

This module imports no transport, so a domain or an adapter may raise these too.
"""

from __future__ import annotations


class Poison(Exception):
    """The message can never be processed: terminate it (no redelivery)."""


class Transient(Exception):
    """The message could be processed later: deliver it again after ``delay`` seconds
    (None: the consumer's default)."""

    def __init__(self, message: str = "", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


__all__ = ["Poison", "Transient"]
