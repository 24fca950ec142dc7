"""The committed protobuf code is what the pinned generator makes of proto/, and the
protos pass ``buf lint``."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sluice.devtools.embedded import venv_binary

REPO = Path(__file__).resolve().parents[2]
CODEGEN = REPO / "scripts" / "proto_codegen.sh"
GENERATED_ROOT = REPO / "libs" / "sluice"


def generated_files(root: Path) -> dict[str, Path]:
    """``<area>/v1/<file>`` -> path, for every file of the generated packages."""
    files: dict[str, Path] = {}
    for package in sorted(root.glob("*/v1")):
        for path in package.iterdir():
            if path.is_file():
                files[str(path.relative_to(root))] = path
    return files


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proto")
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(CODEGEN), str(out)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out / "sluice"


def test_every_proto_package_is_generated(regenerated: Path) -> None:
    protos = {
        p.parent.relative_to(REPO / "proto" / "sluice")
        for p in (REPO / "proto" / "sluice").glob("*/v1/*.proto")
    }
    generated = {d.relative_to(regenerated) for d in regenerated.glob("*/v1")}
    assert generated == protos


def test_committed_generated_code_is_current(regenerated: Path) -> None:
    fresh = generated_files(regenerated)
    committed = generated_files(GENERATED_ROOT)
    missing = sorted(set(fresh) - set(committed))
    extra = sorted(set(committed) - set(fresh))
    stale = sorted(
        name
        for name in set(fresh) & set(committed)
        if not filecmp.cmp(fresh[name], committed[name], shallow=False)
    )
    assert not (missing or extra or stale), (
        "generated code differs from proto/: run 'make proto' and commit the result\n"
        f"missing: {missing}\nnot generated from any .proto: {extra}\nstale: {stale}"
    )


def test_buf_lint_passes() -> None:
    buf = venv_binary("buf")
    result = subprocess.run(
        [str(buf), "lint"],
        cwd=REPO / "proto",
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"buf lint:\n{result.stdout}{result.stderr}"
