"""Resuming a Messages stream, by groups.

The gateway turns each event of a run into a group of Anthropic events and numbers the
group on its last event only (``id: <request_id>:<sequence>``): ``message_start`` and
the first ``content_block_start`` ride in the first group without an id of their own,
``message_stop`` closes the last group and carries its id, heartbeat pings carry none.
A resume (``GET /v1/streams/{id}`` with ``Last-Event-ID``, or the same POST again with
the same ``Idempotency-Key``) renders the same groups byte for byte. So the client holds
events back until the numbered event that closes their group, then passes the whole
group on if its sequence is new, or drops the whole group: each event comes once, and
a group is never cut in two across a reconnect. A stream answered from the cache is not
numbered at all; its ``message_stop`` lets everything held back go and ends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sluice_client._sse import SseEvent, split_id


class UnnumberedResume(Exception):
    """A resumed stream carries no ids though part of it was already passed on, so what
    is new in it cannot be told."""


@dataclass
class MessageGroups:
    """Which groups of a Messages stream are new, across connections."""

    last: int = 0
    """The sequence of the last group passed on (0: none yet)."""
    stream_id: str | None = None
    """The request id in the groups' ids (``None`` until a numbered group arrived)."""
    ended: bool = False
    """Whether the stream's last event (``message_stop``, or an error) was passed on."""
    _held: list[SseEvent] = field(default_factory=list)

    def new_connection(self) -> None:
        """Forgets what a broken connection left unfinished: its group comes again."""
        self._held = []

    def feed(self, event: SseEvent) -> list[SseEvent]:
        """The events to pass on now that ``event`` arrived (often none)."""
        self._held.append(event)
        ids = split_id(event.id)
        if ids is None:
            if event.event == "error":
                # Outside any group: it ends the stream; an unfinished group never will.
                self._held = [event]
                return self._release()
            if event.event != "message_stop":
                return []
            # An unnumbered stream (answered from the cache) ends: all of it goes.
            if self.last > 0:
                self._held = []
                raise UnnumberedResume(
                    "the resumed stream is not numbered, so the part already passed on "
                    "cannot be skipped"
                )
            return self._release()
        self.stream_id = ids[0]
        if ids[1] <= self.last:
            self._held = []
            return []
        self.last = ids[1]
        return self._release()

    def _release(self) -> list[SseEvent]:
        out, self._held = self._held, []
        if any(e.event in ("message_stop", "error") for e in out):
            self.ended = True
        return out
