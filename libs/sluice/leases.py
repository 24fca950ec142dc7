"""Share ids of admission leases: the one format the gateway and the limiter agree on.

A lease is one reservation at the limiter that covers several requests of a key; the
gateway admits each of them locally and names it ``<lease id>~<n>~<tokens>``: the lease,
a number unique within it, and the tokens the request took from it. The id travels as
any reservation id does (the work item, the usage event, a release), so the limiter can
reconcile one request's actual usage against its share of the lease without a field of
its own on every message.
"""

from __future__ import annotations

from dataclasses import dataclass

SEPARATOR = "~"


@dataclass(frozen=True, slots=True)
class Share:
    lease_id: str
    number: int
    tokens: int


def share_id(lease_id: str, number: int, tokens: int) -> str:
    return f"{lease_id}{SEPARATOR}{number}{SEPARATOR}{tokens}"


def parse_share(reservation_id: str) -> Share | None:
    """The share a reservation id names, or None for a reservation of its own."""
    if SEPARATOR not in reservation_id:
        return None
    lease_id, _, rest = reservation_id.partition(SEPARATOR)
    number, _, tokens = rest.partition(SEPARATOR)
    if not (lease_id and number.isdigit() and tokens.isdigit()):
        return None
    return Share(lease_id, int(number), int(tokens))
