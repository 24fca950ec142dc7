"""The client README's Python examples run against the real stack, as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.full_stack import DEV_KEY, FullStack
from tests.support.stack import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

README = REPO / "clients" / "python" / "README.md"


def examples(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_examples() -> None:
    assert len(examples(README)) >= 8


@pytest.mark.parametrize("index", range(len(examples(README))))
def test_readme_example_runs(stack: FullStack, monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    monkeypatch.setenv("SLUICE_API_KEY", DEV_KEY)
    monkeypatch.setenv("SLUICE_BASE_URL", stack.gateway_url)
    code = examples(README)[index]
    exec(compile(code, f"README example {index + 1}", "exec"), {"__name__": "__readme__"})
