"""The guides in docs/guides run, as written, against one real stack (NATS, the
simulated provider and the five services as processes).

Each guide's ``python`` blocks run in order in one namespace (a later block may use what
an earlier one made); its ``bash``/``sh`` blocks run in ``bash -euo pipefail``. Both see
``SLUICE_BASE_URL``, ``SLUICE_API_KEY`` (the dev key) and ``SLUICE_ADMIN_KEY``, as the
quick start tells a reader to set them. A block whose fence says ``no-run`` (```` ```bash
no-run ````) is shown, not run: the set-up lines that need a checkout's ``.sluice``
folder, a server that would block. A failing block fails the guide's test, naming it."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sluice.errors import CATALOGUE

from tests.support.full_stack import DEV_KEY, FullStack, full_stack
from tests.support.stack import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GUIDES = REPO / "docs" / "guides"
RUNNABLE = {"python", "bash", "sh"}
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    guide: str
    line: int
    lang: str
    runs: bool
    code: str

    @property
    def label(self) -> str:
        return f"{self.guide}:{self.line} ({self.lang})"


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for match in _FENCE.finditer(text):
        info = match.group(1).split()
        lang = info[0] if info else ""
        line = text.count("\n", 0, match.start()) + 1
        runs = lang in RUNNABLE and "no-run" not in info[1:]
        out.append(Block(path.name, line, lang, runs, match.group(2)))
    return out


def guides() -> list[Path]:
    return sorted(p for p in GUIDES.glob("*.md") if p.name != "README.md")


@pytest.fixture(scope="package")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FullStack]:
    root = tmp_path_factory.mktemp("guides")
    async with full_stack(
        root,
        gateway_env={
            # The jobs guide's webhook receiver listens on this machine.
            "SLUICE_GATEWAY_WEBHOOK_ALLOW_HOSTS": '["127.0.0.1"]',
            "SLUICE_GATEWAY_WEBHOOK_RETRY_SCHEDULE": "[0, 0.5, 0.5]",
        },
    ) as running:
        yield running


def test_every_guide_is_listed_and_has_code_that_runs() -> None:
    index = (GUIDES / "README.md").read_text(encoding="utf-8")
    assert guides(), "no guides"
    for path in guides():
        assert f"({path.name})" in index, f"{path.name} is not in docs/guides/README.md"
        found = blocks(path)
        langs = {b.lang for b in found if b.runs}
        assert "python" in langs, f"{path.name}: no Python block runs"
        assert langs & {"bash", "sh"}, f"{path.name}: no shell block runs"
        for block in found:
            if block.lang in RUNNABLE or block.lang == "":
                continue
            # Output shown (json, text) is never mistaken for code.
            assert block.lang in {"json", "text", "http"}, block.label


@pytest.mark.parametrize("name", [p.name for p in guides()])
def test_guide_runs(stack: FullStack, tmp_path: Path, name: str) -> None:
    admin_key = (stack.stack.state_dir / "admin-key").read_text().strip()
    env = {
        **os.environ,
        "SLUICE_BASE_URL": stack.gateway_url,
        "SLUICE_API_KEY": DEV_KEY,
        "SLUICE_ADMIN_KEY": admin_key,
        # What the guides' own Python would find as `python`.
        "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    saved = dict(os.environ)
    os.environ.update(env)
    namespace: dict[str, object] = {"__name__": "__guide__"}
    try:
        for block in blocks(GUIDES / name):
            if not block.runs:
                continue
            if block.lang == "python":
                try:
                    exec(compile(block.code, block.label, "exec"), namespace)
                except Exception as exc:
                    raise AssertionError(f"{block.label} failed: {exc!r}") from exc
            else:
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", block.code],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
                assert done.returncode == 0, (
                    f"{block.label} exited {done.returncode}\n"
                    f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
                )
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_the_errors_guide_lists_every_code_with_its_status() -> None:
    text = (GUIDES / "errors.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", text, flags=re.M))
    assert rows == {str(code): str(spec.status) for code, spec in CATALOGUE.items()}
