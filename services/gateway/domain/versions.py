"""The public API's versions, declared once: each a date (``Sluice-Version:
YYYY-MM-DD``), what changed in it, and when it is deprecated and retired.

A request names its version in the ``Sluice-Version`` header, else its key's
``api_version`` (set when the key is made: the version current then), else the current
version. Every response says which version answered it, and a deprecated version's
answers carry ``Deprecation`` (RFC 9745) and ``Sunset`` (RFC 8594). A change that is not
additive (a field, path or operation removed, a type changed, a field newly required)
gets a new version; the old one keeps working beside it until its sunset, then is
refused with 400 ``unsupported_api_version``.

Resolving is a dict lookup and, for a version with a sunset, one comparison with the
clock: the response headers of every version are made once, here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import format_datetime

from sluice.errors import ErrorCode, SluiceError

HEADER = "sluice-version"
_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}")
# What a malformed header is shown as in the error (never more of it).
_SHOWN_CHARS = 40


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


@dataclass(frozen=True)
class ApiVersion:
    """One version of the public API."""

    # The date that names it, as clients send it.
    name: str
    # What this version changed against the one before it (the first: what it is).
    changes: tuple[str, ...]
    # Announced as deprecated from this day (``Deprecation``), retired from this one
    # (``Sunset``; refused from then on).
    deprecated: date | None = None
    sunset: date | None = None
    # The page that says what to move to (``Link: <...>; rel="deprecation"``).
    link: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False, compare=False)
    sunset_unix: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        day = date.fromisoformat(self.name)
        if day.isoformat() != self.name:
            raise ValueError(f"API version {self.name!r} is not a YYYY-MM-DD date")
        if self.sunset and self.deprecated and self.sunset < self.deprecated:
            raise ValueError(f"API version {self.name}: sunset before deprecation")
        out: list[tuple[bytes, bytes]] = [(HEADER.encode(), self.name.encode())]
        announced = self.deprecated or self.sunset
        if announced is not None:
            out.append((b"deprecation", f"@{int(_midnight(announced).timestamp())}".encode()))
        if self.sunset is not None:
            out.append((b"sunset", format_datetime(_midnight(self.sunset), usegmt=True).encode()))
        if self.link and announced is not None:
            out.append((b"link", f'<{self.link}>; rel="deprecation"'.encode()))
        object.__setattr__(self, "headers", tuple(out))
        object.__setattr__(
            self,
            "sunset_unix",
            _midnight(self.sunset).timestamp() if self.sunset is not None else float("inf"),
        )

    def retired(self, now: float) -> bool:
        return now >= self.sunset_unix

class VersionRegistry:
    """The versions by name; ``current`` is the newest, what a new key gets."""

    def __init__(
        self, versions: Iterable[ApiVersion], clock: Callable[[], float] = time.time
    ) -> None:
        ordered = sorted(versions, key=lambda v: v.name)
        if not ordered:
            raise ValueError("at least one API version is needed")
        self.by_name = {v.name: v for v in ordered}
        if len(self.by_name) != len(ordered):
            raise ValueError("an API version is declared twice")
        self.versions = tuple(ordered)
        self.current = ordered[-1]
        # Keys made before versions existed saw the first one.
        self.first = ordered[0]
        self.clock = clock

    def status(self, version: ApiVersion) -> str:
        """``current`` (what new keys get), ``supported``, ``deprecated`` (its
        deprecation day has come) or ``retired`` (past its sunset: refused)."""
        now = self.clock()
        if version.retired(now):
            return "retired"
        if version.deprecated is not None and now >= _midnight(version.deprecated).timestamp():
            return "deprecated"
        return "current" if version is self.current else "supported"

    def supported(self) -> list[str]:
        now = self.clock()
        return [v.name for v in self.versions if not v.retired(now)]

    def _refuse(self, reason: str, requested: str, param: str) -> SluiceError:
        shown = requested[:_SHOWN_CHARS]
        supported = self.supported()
        detail = {
            "malformed": f"'{shown}' is not an API version (YYYY-MM-DD).",
            "unknown": f"There is no API version '{shown}'.",
            "retired": f"The API version '{shown}' passed its sunset and is retired.",
        }[reason]
        return SluiceError(
            ErrorCode.UNSUPPORTED_API_VERSION,
            f"{detail} Supported: {', '.join(supported)}.",
            details={
                "reason": reason,
                "requested": shown,
                "supported": supported,
                "current": self.current.name,
            },
            param=param,
        )

    def resolve(self, raw: str, param: str = "Sluice-Version") -> ApiVersion:
        """The version a client asked for, or 400 ``unsupported_api_version``."""
        version = self.by_name.get(raw)
        if version is None:
            value = raw.strip()
            version = self.by_name.get(value)
            if version is None:
                reason = "unknown" if _FORMAT.fullmatch(value) else "malformed"
                raise self._refuse(reason, value, param)
        if version.sunset is not None and version.retired(self.clock()):
            raise self._refuse("retired", version.name, param)
        return version

    def of_key(self, stored: str) -> ApiVersion:
        """A key's own version: what it stores, or the first version for keys made
        before versions existed."""
        return self.resolve(stored, "api_version") if stored else self.first


# The public API's versions, oldest first. A change that is not additive adds one here
# (and its OpenAPI snapshot, docs/openapi/<version>.json, by `make openapi`), and gives
# the one before it a deprecation and a sunset date.
VERSIONS = VersionRegistry(
    [
        ApiVersion(
            "2026-12-04",
            changes=(
                "The first pinned version: chat completions, Anthropic Messages, "
                "resumable streams, jobs and webhooks, usage and estimates, models, and "
                "the admin API as documented at /docs.",
            ),
        ),
    ]
)


@dataclass
class VersionChoice:
    """A request's version as it becomes known: the header's at the edge, else its
    key's once the caller is known; none yet (a 401, a 404) answers as current."""

    registry: VersionRegistry = VERSIONS
    version: ApiVersion | None = None
    # Named by the request's header (a key's own version then does not apply).
    explicit: bool = False

    def settle_for_key(self, stored: str) -> None:
        """The key's version applies unless the request named one (raises 400
        ``unsupported_api_version`` when the key's version has retired)."""
        if not self.explicit:
            self.version = self.registry.of_key(stored)

    @property
    def answered(self) -> ApiVersion:
        return self.version or self.registry.current
