"""Every line ``sluice up`` prints: progress while it starts, where to point a client once
everything is ready, and what went wrong or is stopping.

On a terminal the current step rewrites one status line in place; otherwise (a log, a
pipe, CI) status lines are printed now and then, so that a slow step still shows life.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MiB"


class Console:
    """Progress lines; on a terminal the current step rewrites one line in place."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._lock = threading.Lock()
        self._pending = False
        self._last_plain = 0.0

    def say(self, text: str) -> None:
        with self._lock:
            if self._pending:
                self.stream.write("\r\033[K" if self.tty else "")
                self._pending = False
            self.stream.write(text + "\n")
            self.stream.flush()

    def status(self, text: str, *, plain_every: float = 10.0) -> None:
        """A transient status line (in place on a terminal, every ``plain_every`` s otherwise)."""
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K" + text)
                self._pending = True
            elif time.monotonic() - self._last_plain >= plain_every:
                self.stream.write(text + "\n")
                self._last_plain = time.monotonic()
            self.stream.flush()

    @contextlib.contextmanager
    def ticker(self, status: Callable[[float], str], interval: float = 0.5) -> Iterator[None]:
        """Show ``status(elapsed_seconds)`` every ``interval`` seconds while the block runs."""
        stop = threading.Event()
        start = time.monotonic()

        def loop() -> None:
            while not stop.wait(interval):
                self.status(status(time.monotonic() - start))

        thread = threading.Thread(target=loop, name="sluice-up-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # --- NATS ---------------------------------------------------------------------------

    def nats_external(self, url: str) -> None:
        self.say(f"nats: using {url} (SLUICE_NATS_URL)")

    def nats_started(self, url: str, store: Path, monitor_port: int | None) -> None:
        self.say(f"nats: {url} with JetStream, store {store}")
        if monitor_port:
            self.say(f"nats: monitoring at http://127.0.0.1:{monitor_port}/connz")

    # --- the local model ----------------------------------------------------------------

    def model_external(self, url: str) -> None:
        self.say(f"model: using {url} (SLUICE_LLAMA_URL)")

    def model_not_started(self) -> None:
        self.say("model: not started (--no-model)")

    def model_preparing(self, model_file: Path, size: int) -> None:
        self.say(
            f"model: preparing {model_file.name} in {model_file.parent} "
            f"(the first run assembles and hashes {_mib(size)})"
        )

    @staticmethod
    def model_assembly_status(model_file: Path, partial: Path, size: int, elapsed: float) -> str:
        """Progress of assembling the model into ``partial`` (not there yet: checking)."""
        try:
            done = partial.stat().st_size
        except OSError:
            return f"model: checking {model_file} ({elapsed:.0f}s)"
        return (
            f"model: assembling and verifying {_mib(done)} / {_mib(size)} "
            f"({100 * done // size}%, {elapsed:.0f}s)"
        )

    def model_verified(self, model_file: Path) -> None:
        self.say(f"model: {model_file} verified")

    @staticmethod
    def model_loading_status(port: int, elapsed: float) -> str:
        return f"model: llama-server loading on port {port} ({elapsed:.0f}s)"

    def model_ready(self, url: str, log_path: Path) -> None:
        self.say(f"model: llama-server ready at {url} (log {log_path})")

    # --- the simulator, the cache's stores, the services ----------------------------------

    def simulator_ready(self, url: str, log_path: Path) -> None:
        self.say(f"simulator: {url} (log {log_path})")

    def cache_stores(self, *, semantic: bool, qdrant_server: bool, qdrant_local: Path) -> None:
        exact = "cache: exact answers in JetStream KV"
        if not semantic:
            self.say(f"{exact}; semantic cache off")
        elif qdrant_server:
            # The URL may carry credentials: say only that a server is used.
            self.say(f"{exact}; semantic vectors on the Qdrant server in QDRANT_URL")
        else:
            self.say(
                f"{exact}; semantic vectors in Qdrant local mode ({qdrant_local}, inside the cache)"
            )

    def services_started(self, names: Iterable[str], logs_dir: Path) -> None:
        self.say(f"services: started {', '.join(names)} (logs in {logs_dir}/)")

    def services_waiting(self, pending: Iterable[str], elapsed: float) -> None:
        self.status(
            f"services: waiting for {', '.join(sorted(pending))} ({elapsed:.0f}s)",
            plain_every=5.0,
        )

    def services_ready(self) -> None:
        self.say("services: all five ready")

    def banner(
        self,
        *,
        url: str,
        key: str | None,
        key_source: str,
        model: str,
        metrics: Iterable[tuple[str, int]],
        nats_url: str,
        logs_dir: Path,
    ) -> None:
        """Where to point a client, once everything answers ready."""
        shown_key = key or f"(not found: see {key_source})"
        metrics_ports = ", ".join(f"{name} :{port}" for name, port in metrics)
        lines = [
            "",
            "Sluice is up.",
            "",
            f"  URL        {url}",
            f"  API key    {shown_key}   (from {key_source})",
            f"  Console    {url}/console   (log in with the API key)",
            f"  Docs       {url}/docs",
            f"  Metrics    {url}/metrics; {metrics_ports} (/metrics on each)",
            f"  NATS       {nats_url}",
            f"  Logs       {logs_dir}/",
            "",
            "  curl:",
            f"    curl {url}/v1/chat/completions \\",
            f"      -H 'Authorization: Bearer {key or '<key>'}' \\",
            "      -H 'Content-Type: application/json' \\",
            f'      -d \'{{"model": "{model}", "messages": '
            '[{"role": "user", "content": "Write hello world in Python"}]}\'',
            "",
            "  Python (openai SDK):",
            "    from openai import OpenAI",
            f'    client = OpenAI(base_url="{url}/v1", api_key="{key or "<key>"}")',
            f'    client.chat.completions.create(model="{model}", '
            'messages=[{"role": "user", "content": "hi"}])',
            "",
            "  Python (anthropic SDK, POST /v1/messages):",
            "    from anthropic import Anthropic",
            f'    client = Anthropic(base_url="{url}", api_key="{key or "<key>"}")',
            f'    client.messages.create(model="{model}", max_tokens=256, '
            'messages=[{"role": "user", "content": "hi"}])',
            "",
            "  The last request as a trace:  .venv/bin/sluice trace --last",
            "",
            "Ctrl-C stops everything.",
        ]
        self.say("\n".join(lines))

    # --- failures and stopping ------------------------------------------------------------

    def stop_requested(self, signal_name: str) -> None:
        self.say(f"\n{signal_name} received: stopping (Ctrl-C again to hurry)")

    def child_exited(self, name: str, code: int | None) -> None:
        self.say(f"\nerror: {name} exited unexpectedly (code {code})")

    def log_tail(self, log_path: Path | None, tail: str) -> None:
        if log_path is not None:
            self.say(f"--- last lines of {log_path}")
        self.say(tail or "(the log is empty)")
        self.say("---")

    def error(self, problem: BaseException) -> None:
        self.say(f"\nerror: {problem}")

    def stopping(self, names: list[str]) -> None:
        if names:
            self.say(f"stopping: {', '.join(names)}")

    def stopped(self) -> None:
        self.say("stopped")
