"""Share ids of admission leases: the one format the gateway and the limiter agree on.

A lease is one reservation at the limiter that covers several requests of a key; the
gateway admits each of them locally and names it ``<lease id>~<n>~<tokens>~<input>``: the
lease, a number unique within it, the tokens the request took from it and how many of
those are input (the rest is output it may produce). The id travels as
any reservation id does (the work item, the usage event, a release), so the limiter can
reconcile one request's actual usage against its share of the lease without a field of
its own on every message. An id without its input part (``<lease id>~<n>~<tokens>``, the
first format) is read with its input unknown (-1).
"""

from __future__ import annotations

from dataclasses import dataclass

SEPARATOR = "~"


@dataclass(frozen=True, slots=True)
class Share:
    lease_id: str
    number: int
    tokens: int
    # Of ``tokens``, the prompt's; -1 when the id does not say.
    input_tokens: int = -1


@dataclass(frozen=True, slots=True)
class Unused:
    """What a lease's holder never handed out, given back when it closes the lease."""

    tokens: int
    requests: int
    input_tokens: int
    output_tokens: int


def share_id(lease_id: str, number: int, tokens: int, input_tokens: int) -> str:
    return f"{lease_id}{SEPARATOR}{number}{SEPARATOR}{tokens}{SEPARATOR}{input_tokens}"


def parse_share(reservation_id: str) -> Share | None:
    """The share a reservation id names, or None for a reservation of its own."""
    if SEPARATOR not in reservation_id:
        return None
    lease_id, _, rest = reservation_id.partition(SEPARATOR)
    number, _, rest = rest.partition(SEPARATOR)
    tokens, _, input_tokens = rest.partition(SEPARATOR)
    if not (lease_id and number.isdigit() and tokens.isdigit()):
        return None
    if input_tokens and not input_tokens.isdigit():
        return None
    known = int(input_tokens) if input_tokens else -1
    return Share(lease_id, int(number), int(tokens), min(known, int(tokens)))
