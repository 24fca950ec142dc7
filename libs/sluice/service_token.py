"""The token every gRPC caller of a service sends (``sluice.grpc_edge`` checks it).

Apart from the edge so that a service reads its token at start without loading grpc,
which loads with the first gRPC connection (``sluice.grpc_door``)."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from sluice.settings import CommonSettings

log = logging.getLogger(__name__)

TOKEN_FILENAME = "service-token"


def service_token(common: CommonSettings) -> str:
    """The token this process's gRPC callers must send (and its own calls send).

    ``SLUICE_SERVICE_TOKEN`` when set; in a local environment without it, the one in
    ``<state_dir>/service-token``, created by whichever process asks first. Outside
    local a missing token raises: a service must not start open to any caller."""
    configured = common.service_token.get_secret_value().strip() if common.service_token else ""
    if configured:
        return configured
    if not common.is_local:
        raise RuntimeError(
            "SLUICE_SERVICE_TOKEN is not set and the environment is not local: refusing "
            "to start a gRPC server that any caller could use"
        )
    return read_or_create_token(common.state_dir)


def read_or_create_token(state_dir: Path) -> str:
    """The token in ``state_dir``, generated on first use. The new token is written to a
    file of its own and hard-linked into place, which fails if another process linked
    its token first: every process ends up reading the one that won, never a half
    written file."""
    path = state_dir / TOKEN_FILENAME
    token = _read_token(path)
    if token:
        return token
    state_dir.mkdir(parents=True, exist_ok=True)
    draft = state_dir / f".{TOKEN_FILENAME}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(draft, path)
            log.info("generated the local service token; it is in %s", path)
        except FileExistsError:
            pass  # another process was first: its token is the one
    finally:
        draft.unlink(missing_ok=True)
    token = _read_token(path)
    if not token:
        raise RuntimeError(f"{path} holds no service token; delete it to make a new one")
    return token


def _read_token(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""
