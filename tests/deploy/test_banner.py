"""What `sluice up` prints once everything answers: where to point a client, the console
and the docs, with the key to use."""

from __future__ import annotations

import io
from pathlib import Path

from sluice.devtools.up.console import Console


def test_the_banner_names_the_console_the_docs_and_the_key() -> None:
    out = io.StringIO()
    Console(out).banner(
        url="http://127.0.0.1:8080",
        key="sk-sluice-example",
        key_source=".sluice/dev-key",
        model="qwen2.5-coder-0.5b",
        metrics=[("limiter", 9101)],
        nats_url="nats://127.0.0.1:4222",
        logs_dir=Path(".sluice/logs"),
    )
    text = out.getvalue()
    assert "Console    http://127.0.0.1:8080/console" in text
    assert "Docs       http://127.0.0.1:8080/docs" in text
    assert "Bearer sk-sluice-example" in text
    assert 'api_key="sk-sluice-example"' in text
